"""An agent's sliding history against a real server: once the window drops the oldest exchange, the shifted
exchanges come from the previous turn's cache (segment reuse), counted in the usage and the metrics."""

from __future__ import annotations

import re

import httpx

SYSTEM = {"role": "system", "content": "You are a support agent for a bicycle shop. Be brief and friendly. " * 6}
EXCHANGES = [("My chain squeaks after rain. What should I use on it?", "A wet-weather chain lube, applied sparingly."),
             ("How often should I re-apply it in winter?", "About every 150 km, or after each very wet ride."),
             ("Should I degrease the chain first?", "Yes, degrease and dry it before the first application."),
             ("Do you sell the degreaser in small bottles?", "Yes, 250 ml bottles are on the shelf by the till.")]


def _segment_tokens(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.search(r"(?m)^inferos_segment_hit_tokens_total (\S+)$", text)
    return float(found.group(1)) if found else 0.0


def _ask(base: str, exchanges, question: str) -> dict:
    messages = [SYSTEM]
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user * 3}, {"role": "assistant", "content": assistant * 3}]
    messages.append({"role": "user", "content": question})
    response = httpx.post(f"{base}/api/v1/chat/completions", timeout=120,
                          json={"messages": messages, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_a_sliding_window_reuses_the_shifted_exchanges(plugin_server):
    system_only = _ask(plugin_server, [], "Thanks! Anything else?")["prompt_tokens"] - 12
    before = _segment_tokens(plugin_server)
    _ask(plugin_server, EXCHANGES[:3], "Thanks! Anything else?")   # the previous turn: kept warm
    sliding = _ask(plugin_server, EXCHANGES[1:4], "Thanks! Anything else?")
    cached = sliding["prompt_tokens_details"]["cached_tokens"]
    assert cached > system_only + 100, (cached, system_only)
    assert _segment_tokens(plugin_server) - before >= cached - system_only - 64
    cold = httpx.post(f"{plugin_server}/api/v1/chat/completions", timeout=120, json={
        "messages": [SYSTEM, {"role": "user", "content": "Hi"}], "max_tokens": 2, "cache_prompt": False}).json()
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
