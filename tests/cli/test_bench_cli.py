"""The benchmark commands write the JSON documented in the issues and a PNG beside it (tiny sizes)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from lemonade_inferos.cli.inferos import cli


def test_bench_engine_writes_both_engines_measured_and_a_plot(model_dir, tmp_path):
    out = tmp_path / "engine.json"
    result = CliRunner().invoke(cli, ["bench", "engine", "--model", str(model_dir), "--prompt-tokens", "48",
                                      "--new-tokens", "8", "--repeats", "1", "--no-llamacpp", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for engine in ("inferos", "og"):
        assert {"prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb"} <= set(doc[engine])
        assert doc[engine]["decode_tps"] > 0 and doc[engine]["peak_rss_mb"] > 100
    assert doc["new_tokens"] == 8 and doc["identical_tokens"] == 8
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert set(doc["conditions"]) == {"1 thread", "2 threads, 1 core busy", "2 threads spinning, 1 core busy"}
    assert all(row["og_decode_tps"] > 0 and row["inferos_decode_tps"] > 0 for row in doc["conditions"].values())


def test_bench_spec_measures_every_config_in_every_condition(model_dir, tmp_path):
    out = tmp_path / "spec.json"
    result = CliRunner().invoke(cli, ["bench", "spec", "--model", str(model_dir), "--new-tokens", "8",
                                      "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 3 * 4 * 5  # conditions x prompt sets x configs
    assert all(row["decode_tps"] > 0 for row in doc["rows"])
    ours = [row for row in doc["rows"] if row["config"].startswith("inferos")]
    assert all(row["identical_tokens"] == 8 for row in ours)  # greedy: speculation changes no token
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_eval_ppl_writes_the_documented_keys(model_dir, tmp_path):
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(cli, ["eval", "ppl", "--model", str(model_dir), "--kv", "fp", "--kv", "int8",
                                      "--context", "192", "--no-llamacpp", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    fp, int8 = (next(p for p in doc["plans"] if p["plan"] == name) for name in ("fp", "int8"))
    assert {"plan", "ppl", "ppl_fp", "delta_ppl", "kld", "top1", "kv_bytes_per_token",
            "fp16_bytes_per_token"} <= set(int8)
    assert abs(int8["delta_ppl"]) < 0.05 and int8["kv_bytes_per_token"] < fp["kv_bytes_per_token"]
    assert out.with_suffix(".png").is_file()


def test_bench_memory_measures_each_row_in_a_fresh_process(model_dir, tmp_path):
    out = tmp_path / "memory.json"
    result = CliRunner().invoke(cli, ["bench", "memory", "--model", str(model_dir), "--context", "256",
                                      "--new-tokens", "4", "--no-llamacpp", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["live_kv"]["live_kv"] == "int8"
    short = doc["contexts"]["256"]
    for row in ("og.Generator", "inferos fp32-live", "inferos int8-live", "inferos int8-live + dynamic@0.9"):
        assert short[row]["peak_rss_mb"] >= short[row]["rss_after_load_mb"] > 100
    assert short["inferos int8-live"]["live_form"] == "int8" and short["inferos fp32-live"]["live_form"] == "float32"
    assert short["inferos int8-live"]["live_vs_fp16_of_held"] == 0.5
    assert short["inferos fp32-live"]["live_vs_fp16_of_held"] == 2.0
    assert "skipped" in short["llama.cpp f16"]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_memory_runs_only_our_evicting_cache_past_the_models_context():
    from lemonade_inferos.bench.memory import _skip_reason

    assert "context" in _skip_reason("og.Generator", 16384, 8192, None)
    assert _skip_reason("inferos int8-live", 16384, 8192, None) is None
    assert "llama-cpp-python" in _skip_reason("llama.cpp q8_0", 2048, 8192, None)


def test_bench_guidance_measures_each_grammar_against_unconstrained_decoding(model_dir, tmp_path):
    out = tmp_path / "guidance.json"
    result = CliRunner().invoke(cli, ["bench", "guidance", "--model", str(model_dir), "--prompt-tokens", "64",
                                      "--new-tokens", "12", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"unconstrained", "all tokens allowed", "tool_choice auto", "JSON schema (array of strings)"}
    assert rows["unconstrained"]["vs_unconstrained"] == 1.0 and all(r["decode_tps"] > 0 for r in rows.values())
    assert out.with_suffix(".png").stat().st_size > 5_000


def test_a_benchmarks_model_is_calibrated_before_any_server_starts(calibrated_model, tmp_path, monkeypatch):
    """A server that calibrates its INT8 scales in the background decodes at half speed meanwhile: the benchmark
    calibrates first, as ``pull`` does."""
    import os
    import shutil

    from lemonade_inferos.cli.bench_servers import _model_and_gguf
    from lemonade_inferos.engine.live_forms import known_scales
    from lemonade_inferos.engine.model_folder import load_model_folder

    home = tmp_path / "home"   # the built model, without its calibration
    shutil.copytree(calibrated_model, home / "models" / calibrated_model.name, copy_function=os.symlink)
    monkeypatch.setenv("INFEROS_HOME", str(home))
    assert known_scales(load_model_folder(calibrated_model)) is None
    folder, gguf = _model_and_gguf("SmolLM2-135M-Instruct-INT4-CPU", None)
    assert known_scales(load_model_folder(folder)) is not None and gguf.suffix == ".gguf"
