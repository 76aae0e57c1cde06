"""Speculative decoding through the server: measured acceptance, counts in the usage and /stats, and the
control API switching it."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lemonade_inferos.controller.auth import read_token_file, token_file
from lemonade_inferos.corpus import corpus_text

from ..conftest import control_url

MODEL = "SmolLM2-135M-Instruct-CPU"
REPEAT = [{"role": "user", "content": corpus_text()[5000:6000] + "\n\nRepeat the text above word for word."}]


def _streamed_usage(base: str) -> dict:
    body = {"model": MODEL, "messages": REPEAT, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/api/v1/chat/completions", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    return events[-1]["usage"]


def test_a_streamed_chat_reports_drafted_and_accepted_tokens(plugin_server):
    usage = _streamed_usage(plugin_server)
    assert usage["inferos"]["drafted_tokens"] > 0 and usage["inferos"]["accepted_tokens"] > 0
    stats = httpx.get(f"{plugin_server}/api/v1/stats").json()["inferos"]
    assert stats["drafted_tokens"] == usage["inferos"]["drafted_tokens"]
    accept = httpx.get(f"{control_url(plugin_server)}/metrics").json()["quality"]["accept_rate"]
    assert 0 < accept["current"] <= 1 and accept["sample_count"] >= 1 and accept["target"] == 0.5
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{plugin_server}/metrics").text)}
    assert {"inferos_speculative_drafted_tokens", "inferos_speculative_accepted_tokens",
            "inferos_speculative_accept_ratio"} <= names


def test_the_control_api_switches_speculation_off_and_on(plugin_server):
    control = control_url(plugin_server)
    headers = {"X-Inferos-Token": read_token_file(token_file())}
    try:
        assert httpx.post(f"{control}/policy", json={"speculative": {"mode": "off"}}, headers=headers).status_code == 200
        assert _streamed_usage(plugin_server)["inferos"]["drafted_tokens"] == 0
    finally:
        httpx.post(f"{control}/policy", json={"speculative": {"mode": "auto"}}, headers=headers)
    assert _streamed_usage(plugin_server)["inferos"]["drafted_tokens"] > 0


def test_bad_speculative_policy_values_are_refused_and_change_nothing(plugin_server):
    control = control_url(plugin_server)
    headers = {"X-Inferos-Token": read_token_file(token_file())}
    before = httpx.get(f"{control}/policy").json()
    for bad in ({"num_draft_tokens": -1}, {"mode": "sometimes"}, {"ngram_min": 5, "ngram_max": 2},
                {"draft_tokens": 3}):
        response = httpx.post(f"{control}/policy", json={"speculative": bad}, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_policy"
    assert httpx.get(f"{control}/policy").json() == before


def test_draft_mode_needs_a_draft_model_that_exists(plugin_server, tmp_path):
    control = control_url(plugin_server)
    headers = {"X-Inferos-Token": read_token_file(token_file())}
    for bad in ({"mode": "draft"}, {"mode": "draft", "draft_model": str(tmp_path / "missing")}):
        response = httpx.post(f"{control}/policy", json={"speculative": bad}, headers=headers)
        assert response.status_code == 400 and "draft_model" in response.json()["error"]["message"]
