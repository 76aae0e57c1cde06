"""One request, or one damaged file, never takes the server down: issue 8's reproductions against real servers.

Each test sends what a user (or a broken client) sent and checks that this request gets a clear 4xx or is
ended, while the server keeps serving everyone else on our engine.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lemonade_inferos.bench.servers import server_process
from lemonade_inferos.controller.auth import read_token_file, token_file

from ..conftest import control_url
from .conftest import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"
HI = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(base: str, timeout: float = 60, **body):
    return httpx.post(f"{base}/api/v1/chat/completions", json={"model": MODEL, "messages": HI, **body},
                      timeout=timeout)


def _metrics(base: str) -> dict:
    return httpx.get(f"{control_url(base)}/metrics", timeout=10).json()


def _engine_of_last_request(base: str) -> str:
    return httpx.get(f"{base}/api/v1/stats", timeout=10).json()["inferos"]["engine"]


def test_a_negative_seed_is_a_random_seed_and_never_opens_the_fallback(plugin_server):
    for _ in range(5):
        reply = _chat(plugin_server, seed=-1, temperature=0.7, max_tokens=8)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        assert _engine_of_last_request(plugin_server) == "inferos"
    for seed in (2**31, 2**63 - 1, 2**70):  # og.Generator takes a C int: folded into its range for both engines
        assert _chat(plugin_server, seed=seed, temperature=0.7, max_tokens=4).status_code == 200
    status = _metrics(plugin_server)["optimization_status"]
    assert not status["baseline_mode"] and status["fallbacks"]["consecutive_backend_errors"] == 0


def test_bad_input_is_a_400_for_that_request_and_nothing_else(plugin_server):
    api = f"{plugin_server}/api/v1"
    json_headers = {"Content-Type": "application/json"}
    cases = [
        httpx.post(f"{api}/unload", content=b"xx", headers=json_headers),
        httpx.post(f"{api}/unload", content=b"[1]", headers=json_headers),
        httpx.post(f"{api}/pull", json={"model_name": "user.y"}),
        httpx.post(f"{api}/pull", json={"model_name": "user.y", "checkpoint": "/nonexistent", "recipe": "oga-npu"}),
        _chat(plugin_server, n=3), _chat(plugin_server, n=-1),
        httpx.post(f"{api}/chat/completions", headers=json_headers,  # NaN is not JSON, but Python clients send it
                   content=json.dumps({"messages": HI, "temperature": float("nan")}).encode()),
        _chat(plugin_server, messages=[{"role": "wizard", "content": "hi"}]),
        httpx.post(f"{api}/responses", json={"model": MODEL, "input": [{"role": "wizard", "content": "x"}]}),
    ]
    control = control_url(plugin_server)
    token = {"X-Inferos-Token": read_token_file(token_file())}
    cases += [httpx.post(f"{control}/evaluate", json=body, headers=token) for body in ({"context": "abc"},
                                                                                       {"context": None})]
    cases += [httpx.post(f"{control}/config", content=raw, headers={**token, **json_headers})
              for raw in (b"[]", b'"str"', b"null")]
    for response in cases:
        assert response.status_code == 400, (response.request.url, response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"]
    assert httpx.get(f"{api}/health").json()["model_loaded"] == MODEL
    assert _chat(plugin_server, max_tokens=6).status_code == 200


def test_a_stored_default_cannot_break_later_requests(plugin_server):
    api = f"{plugin_server}/api/v1"
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"telemetry": {"enabled": "yes"}}):
        response = httpx.post(f"{api}/params", json=bad)
        assert response.status_code == 400, bad
    reply = _chat(plugin_server)  # no max_tokens: the stored default applies
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0


def test_max_tokens_is_capped_at_the_room_left_in_the_context(model_dir):
    with running_server("--plugin", "inferos", "--ctx-size", "96", "--inferos-prefix-spill-mb", "0") as base:
        for huge in (10**9, 2**63 - 1, 2**80):
            started = time.perf_counter()
            reply = httpx.post(f"{base}/api/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": huge, "temperature": 0})
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] <= 96
            assert time.perf_counter() - started < 30


def _wait_busy(base: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while not any(m["is_busy"] for m in httpx.get(f"{base}/api/v1/health").json()["all_models_loaded"]):
        assert time.time() < deadline, "the model never became busy"
        time.sleep(0.05)


def test_a_client_that_hangs_up_ends_its_generation_and_is_not_an_error(model_dir):
    """Non-streaming, max_tokens far past what the client waits for: the next request must not wait for it (one
    place: it would wait if the abandoned run went on)."""
    with running_server("--plugin", "inferos", "--parallel", "1", "--max-queue", "2", "--inferos-prefix-spill-mb",
                        "0") as base:
        assert _chat(base, max_tokens=4).status_code == 200  # engine loaded
        with pytest.raises(httpx.ReadTimeout):
            _chat(base, timeout=1.5, max_tokens=100_000, ignore_eos=True)
        started = time.perf_counter()
        assert _chat(base, max_tokens=4).status_code == 200
        assert time.perf_counter() - started < 5  # the abandoned run (thousands of tokens) was stopped
        totals = _metrics(base)["totals"]
        assert totals["cancelled"] == 1 and totals["errors"] == 0


def test_a_streamed_request_over_a_full_queue_gets_503_and_queue_wait_counts_in_latency(model_dir):
    with running_server("--plugin", "inferos", "--parallel", "1", "--max-queue", "1", "--inferos-prefix-spill-mb",
                        "0") as base:
        assert _chat(base, max_tokens=4).status_code == 200
        results = {}
        running = threading.Thread(target=lambda: results.update(first=_chat(base, max_tokens=150, ignore_eos=True)))
        running.start()
        _wait_busy(base)
        queued = threading.Thread(target=lambda: results.update(second=_chat(base, max_tokens=4)))
        queued.start()
        time.sleep(0.5)  # the second request holds the only queue place
        with httpx.stream("POST", f"{base}/api/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": HI, "stream": True, "max_tokens": 4}) as third:
            third.read()
        assert third.status_code == 503
        assert third.headers["content-type"].startswith("application/json")
        assert json.loads(third.content)["error"]["code"] == "server_busy"
        running.join(60)
        queued.join(60)
        assert results["first"].status_code == 200 and results["second"].status_code == 200
        latency = _metrics(base)["latency"]
        assert latency["queue_wait"]["p95_ms"] > 100 and latency["p95_ms"] > latency["queue_wait"]["p95_ms"]


def test_a_runaway_generation_ends_at_the_time_limit_with_a_clear_error(model_dir):
    with running_server("--plugin", "inferos", "--request-timeout", "2", "--inferos-prefix-spill-mb", "0") as base:
        assert _chat(base, max_tokens=4).status_code == 200
        started = time.perf_counter()
        reply = _chat(base, max_tokens=100_000, ignore_eos=True)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"
        assert time.perf_counter() - started < 6
        with httpx.stream("POST", f"{base}/api/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": HI, "stream": True, "max_tokens": 100_000, "ignore_eos": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"
        assert _chat(base, max_tokens=4).status_code == 200
        assert _engine_of_last_request(base) == "inferos"
        status = _metrics(base)["optimization_status"]["fallbacks"]
        assert status["consecutive_backend_errors"] == 0 and status["backend_backoff_s"] == 0


def test_a_corrupt_spill_file_is_quarantined_and_the_conversation_served_by_our_engine(isolated_home, tmp_path):
    env = {"INFEROS_HOME": str(isolated_home)}
    messages = [{"role": "system", "content": "You answer questions about the Python standard library. " * 12},
                {"role": "user", "content": "What does the os module do?"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    with running_server("--plugin", "inferos", env=env) as base:  # SIGTERM at the end writes the store to disk
        assert httpx.post(f"{base}/api/v1/chat/completions", json=body, timeout=60).status_code == 200
    spilled = sorted((isolated_home / "prefix-cache").glob("*.npz"))
    assert len(spilled) >= 3
    with spilled[1].open("r+b") as fh:  # `truncate -s 200000` on one block of the conversation
        fh.truncate(spilled[1].stat().st_size // 2)
    with running_server("--plugin", "inferos", env=env) as base:
        for _ in range(6):
            reply = httpx.post(f"{base}/api/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
            assert _engine_of_last_request(base) == "inferos"
        metrics = _metrics(base)
        assert metrics["optimization_status"]["fallbacks"]["consecutive_backend_errors"] == 0
        assert metrics["prefix_cache"]["spill"]["corrupt_files"] == 1
    assert [p.name.endswith(spilled[1].name) for p in (isolated_home / "quarantine").iterdir()] == [True]


def test_damaged_state_files_are_set_aside_and_the_server_starts(isolated_home, tmp_path):
    spill = isolated_home / "prefix-cache"
    spill.mkdir()
    (spill / f"{'ab' * 16}.tmp.npz").write_bytes(b"PK\x03\x04 half a block")  # a crashed writer's temporary
    (isolated_home / "history.jsonl").write_bytes(b'{"kind": "policy"}\n\xff\xfe\n42\n')
    (isolated_home / "agent-token").write_bytes(b"\x00\x01not a token")
    (isolated_home / "user_models.json").write_text("{not json")
    log_path = tmp_path / "server.log"
    env = {"INFEROS_HOME": str(isolated_home), "INFEROS_AGENT_TOKEN": ""}
    with running_server("--plugin", "inferos", env=env, log_path=log_path) as base:
        history = httpx.get(f"{control_url(base)}/history", params={"kind": "x"})
        assert history.status_code == 200 and history.json()["history"] == []
        assert httpx.get(f"{base}/api/v1/models").status_code == 200
        assert _chat(base, max_tokens=4).status_code == 200
    quarantined = sorted(p.name.split("-", 2)[2] for p in (isolated_home / "quarantine").iterdir())
    assert quarantined == sorted([f"{'ab' * 16}.tmp.npz", "history.jsonl", "agent-token", "user_models.json"])
    log = log_path.read_text()
    for name in quarantined:
        assert name in log  # every file set aside is named in a warning
    assert read_token_file(isolated_home / "agent-token") is not None  # a new token replaced the damaged one


def test_state_written_by_the_server_is_never_left_half_written(isolated_home):
    """Every state file appears under its real name only complete: no temporaries are left after a run."""
    env = {"INFEROS_HOME": str(isolated_home)}
    with server_process("--plugin", "inferos", env=env) as (base, proc):
        assert _chat(base, max_tokens=4).status_code == 200
    leftovers = [p for p in isolated_home.rglob("*") if "tmp" in p.name and "models" not in p.parts]
    assert leftovers == [] and proc.returncode == 0
