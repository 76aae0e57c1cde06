"""``inferos bench peers``: how each server is started, and a workload run against a real server of ours (llama-server
itself is a benchmark-only binary, never a CI requirement)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lemonade_inferos.bench.peer_workloads import PeerPrompts
from lemonade_inferos.bench.concurrency import ratios
from lemonade_inferos.bench.peers import (LLAMA, LLAMA_REUSE, OURS, OURS_SERIAL, PeerSetup, peers_for, run_once,
                                       summarize)
from lemonade_inferos.engine.tokenizer import ChatTokenizer

SETUP = PeerSetup(Path("/opt/llama-server"), Path("/models/m.gguf"), "SmolLM2-135M-Instruct-CPU", ctx_size=4096)


def test_each_server_is_started_as_its_users_run_it():
    peers = {p.name: p for p in peers_for(SETUP, ["decode", "decode_spec", "sliding"])}
    ours, _ = peers[OURS].command(1234, "decode", SETUP, Path("/tmp/state"))
    assert ours[-2:] == ["--plugin-option", "inferos.speculative.mode=off"] and "--ctx-size" in ours
    assert "inferos.prefix_spill_dir=/tmp/state" in ours   # a fresh server finds no spill of an earlier run
    assert "inferos.speculative.mode=off" not in peers[OURS].command(1234, "decode_spec", SETUP, Path("/tmp/state"))[0]
    llama, ready = peers[LLAMA].command(1234, "decode_spec", SETUP, Path("/tmp/state"))
    assert ready == "/health" and llama[llama.index("-c") + 1] == "16384" and llama[llama.index("-np") + 1] == "4"
    assert llama[-2:] == ["--spec-type", "ngram-simple"]
    assert peers[LLAMA_REUSE].workloads == ("sliding",)
    assert peers[LLAMA_REUSE].command(1234, "sliding", SETUP, Path("/tmp/state"))[0][-2:] == ["--cache-reuse", "256"]
    # the 6.9K-token prompt needs 8K of context on both
    long_ours, _ = peers[OURS].command(1234, "long_7k", SETUP, Path("/tmp/state"))
    long_llama, _ = peers[LLAMA].command(1234, "long_7k", SETUP, Path("/tmp/state"))
    assert long_ours[long_ours.index("--ctx-size") + 1] == "8192" and long_llama[long_llama.index("-c") + 1] == "32768"


def test_a_workload_runs_against_a_fresh_server_and_its_peak_rss_is_measured(calibrated_model, tmp_path):
    prompts = PeerPrompts.build(ChatTokenizer.from_folder(calibrated_model))
    setup = replace(SETUP, fp16_kv_bytes_per_token=2 * 30 * 3 * 64 * 2)   # SmolLM2-135M's K and V at FP16
    ours = peers_for(setup, ["decode"])[0]
    metrics = run_once(ours, "decode", setup, prompts, tmp_path / "server.log")
    assert metrics["completion_tokens"] == 128 and metrics["decode_tps"] > 0 and metrics["ttft_s"] > 0
    assert metrics["peak_rss_mb"] > 100   # the model's weights alone are ~540 MiB at fp32
    assert 0 <= metrics["rss_growth_mb"] < metrics["peak_rss_mb"]
    fp16_kv_mb = setup.fp16_kv_bytes_per_token * metrics["prompt_tokens"] / 2**20
    assert metrics["rss_growth_vs_fp16_kv"] == metrics["rss_growth_mb"] / fp16_kv_mb
    results = summarize(SETUP, {"decode": {OURS: [metrics]}}, runs=1)
    entry = results["workloads"]["decode"]
    assert entry["headline"] == "decode_tps" and entry["peers"][OURS]["decode_tps"]["median"] == metrics["decode_tps"]
    assert "ratio_vs_llama" not in entry   # no llama-server in this run: no ratio is made up


def test_many_clients_run_on_ours_on_ours_one_at_a_time_and_on_llama_server_where_given(calibrated_model, tmp_path):
    peers = {p.name: p for p in peers_for(SETUP, ["clients_4", "decode"])}
    serial, _ = peers[OURS_SERIAL].command(1234, "clients_4", SETUP, Path("/tmp/state"))
    assert peers[OURS_SERIAL].workloads == ("clients_4",) and serial[-2:] == ["--parallel", "1"]
    assert "inferos.speculative.mode=off" in serial and serial[1:3] == ["-m", "lemonade_inferos.cli.lemonade_server"]
    alone = peers_for(replace(SETUP, llama_server=None), ["clients_2"])
    assert [p.name for p in alone] == [OURS, OURS_SERIAL], "without llama-server: ours against itself"
    prompts = PeerPrompts.build(ChatTokenizer.from_folder(calibrated_model))
    metrics = run_once(alone[0], "clients_2", SETUP, prompts, tmp_path / "server.log")
    assert metrics["requests"] == 8 and 0 < metrics["ttft_p50_s"] <= metrics["ttft_p95_s"] <= metrics["latency_p95_s"]
    assert metrics["total_tps"] > 0
    peer = {m: {"median": metrics[m]} for m in ("ttft_p95_s", "total_tps")}
    assert ratios({OURS: peer, OURS_SERIAL: peer})[OURS_SERIAL] == {"ttft_p95_s": 1.0, "total_tps": 1.0}


def test_the_chat_says_how_many_new_tokens_its_last_turn_prefilled(calibrated_model, tmp_path):
    """Each server's history holds its own replies: the last turn's TTFT is read with the tokens it prefilled."""
    prompts = PeerPrompts.build(ChatTokenizer.from_folder(calibrated_model))
    ours = peers_for(SETUP, ["chat_10"])[0]
    metrics = run_once(ours, "chat_10", SETUP, prompts, tmp_path / "server.log")
    assert 0 < metrics["last_new_tokens"] < metrics["last_prompt_tokens"]   # the history before it was reused
    assert metrics["last_ttft_s"] > 0
