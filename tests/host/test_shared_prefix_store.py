"""Servers sharing one prefix store on a real redis-server (`--inferos-prefix-store valkey://...`): the second
server's first turn of a conversation the first served is a hit; with the store killed mid-run every request
still completes (local tiers only), and the outage is visible in the metrics."""

from __future__ import annotations

import re
import time

import httpx

from lemonade_inferos.bench.servers import running_server
from lemonade_inferos.corpus import corpus_text

MODEL = "SmolLM2-135M-Instruct-CPU"


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.search(rf"(?m)^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text)
    return float(found.group(1)) if found else float("nan")


def _written(base: str, timeout_s: float = 30) -> float:
    """Wait until the server's write-through queue is sent; the blocks written so far."""
    deadline, last = time.monotonic() + timeout_s, -1.0
    while time.monotonic() < deadline:
        now = _metric(base, "inferos_shared_store_writes_total")
        if now > 0 and now == last:
            return now
        last = now
        time.sleep(0.3)
    return last


def _server(url: str, home, log):
    return running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", "--inferos-prefix-store", url,
                          env={"INFEROS_HOME": str(home)}, log_path=log)


def _chat(base: str, messages: list[dict], max_tokens: int = 8) -> dict:
    response = httpx.post(f"{base}/api/v1/chat/completions", timeout=180,
                          json={"model": MODEL, "messages": messages, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_second_server_gets_the_first_servers_blocks(redis_server, calibrated_model, tmp_path):
    from tests.conftest import _isolated_home

    redis_server.client().flushall()
    document = corpus_text()[:7000]
    messages = [{"role": "system", "content": "Answer from the document.\n" + document},
                {"role": "user", "content": "What is this about?"}]
    with _server(redis_server.url, _isolated_home(calibrated_model, tmp_path / "a"), tmp_path / "a.log") as first:
        cold = _chat(first, messages)
        assert cold["usage"]["prompt_tokens"] > 1500
        assert _written(first) >= cold["usage"]["prompt_tokens"] // 32
    with _server(redis_server.url, _isolated_home(calibrated_model, tmp_path / "b"), tmp_path / "b.log") as second:
        warm = _chat(second, messages)
        cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= warm["usage"]["prompt_tokens"] - 64, "every full block came from the shared store"
        assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
        assert _metric(second, 'inferos_prefix_hit_blocks_total{tier="shared"}') == cached // 32
        assert _metric(second, "inferos_shared_store_up") == 1.0


def test_requests_complete_when_the_store_dies_mid_run(own_redis_server, isolated_home, tmp_path):
    chats = [[{"role": "system", "content": f"You are assistant number {i}. " * 12}] for i in range(4)]
    with _server(own_redis_server.url, isolated_home, tmp_path / "server.log") as base:
        for turn in range(3):
            if turn == 1:
                own_redis_server.stop()
            for chat in chats:
                chat.append({"role": "user", "content": f"Turn {turn}: say something short."})
                reply = _chat(base, chat)
                chat.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        assert _metric(base, "inferos_shared_store_errors_total") >= 1
        assert _metric(base, "inferos_shared_store_up") == 0.0
        assert _chat(base, chats[0] + [{"role": "user", "content": "And now?"}])["usage"]["prompt_tokens_details"][
            "cached_tokens"] > 0, "the local tiers still serve the prefix"
        health = httpx.get(f"{base}/api/v1/health", timeout=30)
        assert health.status_code == 200
