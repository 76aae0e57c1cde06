"""Nothing one request sends stalls the others or answers a 5xx: bodies over the limit, bodies of every size up to
it, lone surrogates, invalid UTF-8, deep nesting, and a stream that keeps flowing while all of that arrives.

One plugin server with its own home and the default body limit (8 MiB).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time

import httpx
import psutil
import pytest

from lemonade_inferos.bench.servers import server_process
from lemonade_inferos.host.settings import HostSettings

from ..conftest import control_url

MODEL = "SmolLM2-135M-Instruct-CPU"
LIMIT = HostSettings().max_body_bytes
JSON = {"content-type": "application/json"}
POST_ROUTES = ["/api/v1/chat/completions", "/api/v1/completions", "/api/v1/responses", "/api/v1/load",
               "/api/v1/unload", "/api/v1/pull", "/api/v1/delete", "/api/v1/params", "/api/v1/models/register",
               f"/api/v1/models/{MODEL}/options", "/api/chat", "/api/generate", "/internal/set"]
GENERATE_ROUTES = {  # route: a body asking for a short reply to TEXT
    "/api/v1/chat/completions": lambda text: {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": text}]},
    "/api/v1/completions": lambda text: {"model": MODEL, "max_tokens": 4, "prompt": text, "echo": True},
    "/api/v1/responses": lambda text: {"model": MODEL, "max_output_tokens": 4, "input": text},
    "/api/chat": lambda text: {"model": MODEL, "stream": False, "options": {"num_predict": 4},
                               "messages": [{"role": "user", "content": text}]},
    "/api/generate": lambda text: {"model": MODEL, "stream": False, "options": {"num_predict": 4}, "prompt": text},
}


@contextlib.contextmanager
def _warm_server(home, log_path):
    """A server warmed by one chat (the engine's first run allocates what later runs reuse)."""
    with server_process("--plugin", "inferos", env={"INFEROS_HOME": str(home)}, log_path=log_path) as (base, proc):
        warm = httpx.post(f"{base}/api/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 64, "ignore_eos": True, "messages": [{"role": "user", "content": "Hi"}]})
        assert warm.status_code == 200
        yield base, psutil.Process(proc.pid), log_path


@pytest.fixture(scope="module")
def server(isolated_home_module, tmp_path_factory):
    with _warm_server(isolated_home_module, tmp_path_factory.mktemp("logs") / "server.log") as running:
        yield running


@pytest.fixture
def fresh_server(isolated_home, tmp_path):
    """A server of its own: what other tests loaded and unloaded is not in its memory."""
    with _warm_server(isolated_home, tmp_path / "server.log") as running:
        yield running


def _error(reply: httpx.Response, status: int, code: str) -> dict:
    assert reply.status_code == status, reply.text[:300]
    error = reply.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_a_body_over_the_limit_is_a_413_in_the_error_shape_declared_or_chunked(server):
    base, _, _ = server
    for route in ("/api/v1/chat/completions", "/api/generate", "/internal/set"):
        error = _error(httpx.post(base + route, content=b"x" * (LIMIT + 1), headers=JSON), 413, "request_too_large")
        assert error["details"]["max_body_bytes"] == LIMIT and "--max-body-mb" in error["message"]
        chunks = (b" " * 2**20 for _ in range(LIMIT // 2**20 + 1))  # no Content-Length: counted as it arrives
        _error(httpx.post(base + route, content=chunks, headers=JSON, timeout=60), 413, "request_too_large")


def test_bodies_from_one_byte_to_the_limit_on_every_post_route_are_never_a_server_error(server):
    base, _, _ = server
    rng = random.Random(24)
    with httpx.Client(base_url=base, timeout=120) as client:
        for size in (1, 2, 17, 1024, 65_536, 2**20, LIMIT):
            junk = rng.randbytes(size)
            spaces = b"{" + b" " * max(0, size - 2) + b"}"[: size - 1]  # JSON (an empty object) when size >= 2
            for route in POST_ROUTES:
                # an empty object is a valid request to some routes (unload: every model); generate routes only
                for body in (junk, spaces) if route in GENERATE_ROUTES else (junk,):
                    reply = client.post(route, content=body, headers=JSON)
                    assert reply.status_code < 500, f"{route} {size} bytes: {reply.text[:300]}"
                    if reply.status_code >= 400:
                        assert reply.json()["error"]["code"], reply.text[:300]
        # a prompt as long as the limit allows: refused as over the context, without tokenizing all of it
        for route, body in GENERATE_ROUTES.items():
            text = "word " * ((LIMIT - 300) // 5)
            started = time.perf_counter()
            error = _error(client.post(route, json=body(text)), 400, "context_length_exceeded")
            assert "shorten it" in error["message"] and time.perf_counter() - started < 10, route


@pytest.mark.parametrize("route", GENERATE_ROUTES)
def test_a_lone_surrogate_is_answered_as_the_replacement_character_on_every_generate_route(server, route):
    base, _, _ = server
    body = json.dumps(GENERATE_ROUTES[route]("cut emoji: a\ud83d then b")).encode()  # \ud83d: a lone high half
    assert b"\\ud83d" in body
    reply = httpx.post(base + route, content=body, headers=JSON, timeout=120)
    assert reply.status_code == 200, reply.text[:300]
    if route == "/api/v1/completions":  # echo shows what the prompt became
        assert reply.json()["choices"][0]["text"].startswith("cut emoji: a\ufffd then b")


def test_a_streamed_chat_with_a_lone_surrogate_streams(server):
    base, _, _ = server
    body = json.dumps({**GENERATE_ROUTES["/api/v1/chat/completions"]("a\udc00b"), "stream": True}).encode()
    with httpx.stream("POST", f"{base}/api/v1/chat/completions", content=body, headers=JSON, timeout=120) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert reply.status_code == 200 and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("body", [b'{"model": "x", "messages": [{"role": "user", "content": "a\xff"}]}',
                                  b"[" * 100_000 + b"]" * 100_000,
                                  b'{"model": "x", "response_format": ' + b'{"a":' * 200 + b"1" + b"}" * 201],
                         ids=["invalid-utf8", "depth-100000", "depth-200-inside"])
def test_invalid_utf8_and_deep_nesting_are_invalid_json_on_every_post_route(server, body):
    base, _, _ = server
    for route in POST_ROUTES:
        _error(httpx.post(base + route, content=body, headers=JSON, timeout=60), 400, "invalid_json")


def test_the_control_api_answers_invalid_json_and_invalid_yaml_to_bad_config_bodies(server, isolated_home_module):
    base, _, _ = server
    headers = {"X-Inferos-Token": (isolated_home_module / "agent-token").read_text().strip()}
    config = f"{control_url(base)}/config"
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"kv": "\xff"}', b'{"kv": '):
        _error(httpx.post(config, content=body, headers={**headers, **JSON}), 400, "invalid_json")
    yaml = {**headers, "content-type": "application/yaml"}
    for body in (b"a: " + b"[" * 100_000, b"[" * 60 + b"1" + b"]" * 60, b"kv: \xff", b"kv: [1"):
        _error(httpx.post(config, content=body, headers=yaml), 400, "invalid_yaml")
    _error(httpx.post(config, content=b"x" * (2**20 + 1), headers=yaml), 413, "request_too_large")
    assert httpx.get(f"{control_url(base)}/health").json()["status"] == "healthy"


def test_a_stream_and_health_keep_flowing_while_huge_and_deep_bodies_arrive(fresh_server):
    """The issue's targets: health answers and the stream never pauses over a second; RSS grows < 100 MiB."""
    base, process, log_path = fresh_server
    rss_before, peak = process.memory_info().rss, [0]
    gaps, health, done = [], [], threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        last = None
        with httpx.stream("POST", f"{base}/api/v1/chat/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
        done.set()

    def watch() -> None:
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(f"{base}/api/v1/health", timeout=30)
            health.append(time.perf_counter() - started)
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)

    threads = [threading.Thread(target=stream), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    hostile = [(b"x" * (50 * 2**20), 413, "request_too_large"),
               (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
               (b"{" + b" " * (10 * 2**20) + b"}", 413, "request_too_large"),
               (json.dumps(GENERATE_ROUTES["/api/v1/chat/completions"]("word " * 1_650_000)).encode(), 400,
                "context_length_exceeded"),
               (json.dumps(GENERATE_ROUTES["/api/v1/chat/completions"]("w" * 8_200_000)).encode(), 400,
                "context_length_exceeded")]
    with httpx.Client(timeout=120) as client:
        for body, status, code in hostile:
            _error(client.post(f"{base}/api/v1/chat/completions", content=body, headers=JSON), status, code)
    for thread in threads:
        thread.join(timeout=120)
    assert len(gaps) >= 300, "the stream ended early"
    assert max(gaps) < 1.0 and max(health) < 1.0, (max(gaps), max(health))
    assert (peak[0] - rss_before) / 2**20 < 100
    assert "Traceback" not in log_path.read_text()
