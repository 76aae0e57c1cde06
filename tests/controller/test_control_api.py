"""The control API over real HTTP, on the plugin's own server."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lemonade_inferos.controller.auth import token_file
from lemonade_inferos.metrics.recorder import History


@pytest.fixture(scope="module")
def control(plugin_server):
    health = httpx.get(f"{plugin_server}/api/v1/health").json()
    api = health["inferos"]["control_api"]
    assert api["running"], api
    return api["url"]


@pytest.fixture(scope="module")
def token(control):
    import os
    return os.environ.get("INFEROS_AGENT_TOKEN") or token_file().read_text().strip()


def _error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code and body["message"] and "details" in body


@pytest.mark.parametrize("path,body", [("/policy", {"kv": {"recent_window": 128}}), ("/baseline", {"enable": False}),
                                       ("/config", {"reload": True})])
def test_every_write_needs_the_token(control, path, body):
    _error(httpx.post(control + path, json=body), 401, "unauthorized")
    _error(httpx.post(control + path, json=body, headers={"X-Inferos-Token": "wrong"}), 401, "unauthorized")


def test_reads_need_no_token_and_carry_security_headers(control):
    response = httpx.get(control + "/health")
    assert response.status_code == 200 and response.json()["status"] == "healthy"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_cors_admits_loopback_origins_only(control):
    ok = httpx.options(control + "/policy", headers={"Origin": "http://localhost:3000",
                                                     "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
    denied = httpx.options(control + "/policy", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in denied.headers


def test_policy_update_merges_and_bad_values_change_nothing(control, token):
    headers = {"X-Inferos-Token": token}
    applied = httpx.post(control + "/policy", json={"kv": {"recent_window": 96}}, headers=headers).json()
    assert applied["policy"]["kv"]["recent_window"] == 96
    assert applied["policy"]["kv"]["level_thresholds"]["L1_int8"] == 0.7
    _error(httpx.post(control + "/policy", json={"kv": {"recent_window": 4}}, headers=headers), 400,
           "invalid_policy")
    _error(httpx.post(control + "/policy", json={"io": {"dml_pool_bytes": "12 apples"}}, headers=headers), 400,
           "invalid_policy")
    assert httpx.get(control + "/policy").json()["policy"]["kv"]["recent_window"] == 96
    httpx.post(control + "/policy", json={"kv": {"recent_window": 64}}, headers=headers)


def test_config_post_validates_and_names_the_field(control, token):
    headers = {"X-Inferos-Token": token, "Content-Type": "application/yaml"}
    response = httpx.post(control + "/config", content="infer_os:\n  kv:\n    recent_window: 1\n", headers=headers)
    _error(response, 400, "invalid_config")
    assert response.json()["error"]["details"]["field"] == "infer_os.kv.recent_window"
    good = httpx.post(control + "/config", content="infer_os:\n  kv:\n    recent_window: 64\n", headers=headers)
    assert good.status_code == 200 and good.json()["infer_os"]["kv"]["recent_window"] == 64


def test_metrics_have_the_design_documents_shape_with_measured_values(control, plugin_server):
    client = openai.OpenAI(base_url=f"{plugin_server}/api/v1", api_key="x")
    client.chat.completions.create(model="SmolLM2-135M-Instruct-CPU", max_tokens=8,
                                   messages=[{"role": "user", "content": "Say hi."}])
    metrics = httpx.get(control + "/metrics").json()
    for key in ("timestamp", "measurement_window", "throughput", "latency", "first_token_latency", "quality",
                "memory", "device_utilization", "optimization_status", "kv_stats"):
        assert key in metrics
    assert metrics["measurement_window"]["sample_count"] >= 1
    assert metrics["first_token_latency"]["mean_ms"] > 0 and metrics["latency"]["p95_ms"] > 0
    assert metrics["throughput"]["tokens_per_second"] > 0
    assert metrics["device_utilization"]["npu_utilization"] is None and metrics["device_utilization"]["reason"]
    assert metrics["memory"]["rss_mb"] > 0
    # the server runs the INT8 live form: every held token is an INT8 code, nothing at the model's fp32
    assert metrics["kv_stats"]["live_form"] == "int8"
    assert metrics["kv_stats"]["bytes_by_tier"]["L1_int8"] > 0 and metrics["kv_stats"]["bytes_by_tier"]["L0"] == 0
    assert metrics["memory"]["warm_cache_bytes"] > 0  # the finished chat's live cache, kept for its next turn
    memory = metrics["memory"]
    assert memory["live_form"]["live_kv"] == "int8" and memory["live_form"]["scales"]["source"].startswith("calib")
    assert memory["kv_running_requests"] == 0 and memory["kv_live_mb"] == 0   # nothing runs between requests
    assert memory["kv_at_rest_mb"] * 2**20 == memory["prefix_cache_bytes"] + memory["warm_cache_bytes"]
    assert memory["kv_cache_usage_mb"] == memory["kv_live_mb"] + memory["kv_at_rest_mb"]


def test_stats_report_live_bytes_of_a_running_request_and_at_rest_bytes(plugin_server):
    """While a long generation runs, /api/v1/stats shows its working buffer as live bytes; after it, none."""
    import threading

    body = {"model": "SmolLM2-135M-Instruct-CPU", "max_tokens": 400, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    done = threading.Event()
    worker = threading.Thread(target=lambda: (httpx.post(f"{plugin_server}/api/v1/chat/completions", json=body,
                                                         timeout=120), done.set()))
    worker.start()
    seen = None
    while not done.is_set():
        memory = httpx.get(f"{plugin_server}/api/v1/stats", timeout=10).json()["inferos"]["kv_memory"]
        if memory["running_requests"]:
            seen = memory
            break
        done.wait(0.05)
    worker.join()
    assert seen is not None, "the running request was never seen"
    assert seen["live_bytes"] >= seen["live_working_buffer_bytes"] > 0
    assert seen["live_form"]["live_kv"] == "int8"
    after = httpx.get(f"{plugin_server}/api/v1/stats", timeout=10).json()["inferos"]["kv_memory"]
    assert after["running_requests"] == 0 and after["live_bytes"] == 0 and after["at_rest_bytes"] > 0
    assert after["kv_cache_usage_bytes"] == after["at_rest_bytes"]


def test_prometheus_exposition_parses(control):
    text = httpx.get(control + "/metrics/prometheus").text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"inferos_time_to_first_token_mean_seconds", "inferos_kv_cache_bytes", "inferos_controller_requests",
            "inferos_process_resident_memory_bytes", "inferos_warm_cache_bytes", "inferos_prefix_cache_bytes",
            "inferos_kv_live_bytes", "inferos_kv_at_rest_bytes"} <= names


def test_baseline_mode_turns_every_optimisation_off_until_disabled(control, token, plugin_server):
    headers = {"X-Inferos-Token": token}
    client = openai.OpenAI(base_url=f"{plugin_server}/api/v1", api_key="x")
    ask = lambda: client.chat.completions.create(model="SmolLM2-135M-Instruct-CPU", max_tokens=4,  # noqa: E731
                                                 messages=[{"role": "user", "content": "Hi"}])
    assert httpx.post(control + "/baseline", json={"enable": True}, headers=headers).json()["baseline_mode"]
    try:
        ask()
        assert httpx.get(f"{plugin_server}/api/v1/stats").json()["inferos"]["engine"] == "og"
        assert httpx.get(control + "/metrics").json()["optimization_status"]["baseline_mode"] is True
    finally:
        httpx.post(control + "/baseline", json={"enable": False}, headers=headers)
    ask()
    assert httpx.get(f"{plugin_server}/api/v1/stats").json()["inferos"]["engine"] == "inferos"
    kinds = [e.get("kind") for e in httpx.get(control + "/history", params={"kind": "baseline"}).json()["history"]]
    assert kinds[-2:] == ["baseline", "baseline"]
    events = httpx.get(control + "/history", params={"events": "true", "limit": 1000}).json()["history"]
    assert [e["kind"] for e in events if e["kind"] == "baseline"][-2:] == ["baseline", "baseline"]
    assert all(e["kind"] != "snapshot" for e in events)


def test_history_survives_a_restart(tmp_path):
    history = History(tmp_path / "history.jsonl", max_entries=3)
    for i in range(5):
        history.append({"kind": "snapshot", "i": i})
    reopened = History(tmp_path / "history.jsonl", max_entries=3)
    assert [e["i"] for e in reopened.entries()] == [2, 3, 4]


def test_bad_history_limit_is_400(control):
    _error(httpx.get(control + "/history", params={"limit": 0}), 400, "invalid_request")


def test_a_full_evaluation_can_be_scheduled(control, token, plugin_server):
    import time

    openai.OpenAI(base_url=f"{plugin_server}/api/v1", api_key="x").chat.completions.create(
        model="SmolLM2-135M-Instruct-CPU", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    headers = {"X-Inferos-Token": token}
    _error(httpx.post(control + "/evaluate", json={"context": 10}, headers=headers), 400, "invalid_request")
    assert httpx.post(control + "/evaluate", json={"context": 256}, headers=headers).json()["status"] in (
        "scheduled", "running")
    deadline = time.time() + 120
    while time.time() < deadline:
        result = httpx.get(control + "/metrics").json()["quality"]["full_evaluation"]
        if result["status"] not in ("scheduled", "running"):
            break
        time.sleep(1)
    assert result["status"] in ("within_threshold", "over_threshold"), result
    assert result["baseline_ppl"] > 1 and result["current_ppl"] > 1


def test_with_kv_mode_disabled_a_repeated_prompt_is_restored_exactly(plugin_server, control, token):
    client = openai.OpenAI(base_url=f"{plugin_server}/api/v1", api_key="unused")
    headers = {"X-Inferos-Token": token}
    messages = [{"role": "system", "content": "You are a meticulous geographer. " * 12},
                {"role": "user", "content": "Describe the river Danube."}]
    previous = httpx.get(f"{control}/policy").json()["policy"]["kv"]["mode"]
    assert httpx.post(f"{control}/policy", json={"kv": {"mode": "disabled"}}, headers=headers).status_code == 200
    try:
        replies = [client.chat.completions.create(model="SmolLM2-135M-Instruct-CPU", max_tokens=40, temperature=0,
                                                  messages=messages) for _ in range(2)]
        tiers = httpx.get(f"{control}/metrics").json()["memory"]["kv_bytes_by_tier"]  # of the last request
    finally:
        httpx.post(f"{control}/policy", json={"kv": {"mode": previous}}, headers=headers)
    assert replies[1].usage.prompt_tokens_details.cached_tokens > 0
    assert replies[1].choices[0].message.content == replies[0].choices[0].message.content
    assert tiers["L0"] > 0 and tiers["L1_int8"] == 0 and tiers["L2_int4"] == 0  # restored at full precision
