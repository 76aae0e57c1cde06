from __future__ import annotations

import json
import time

from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats
from lemonade_inferos.plugin import InferosPlugin


def _stats(error=None, baseline=False, error_kind="fault"):
    now = time.time()
    return InferenceStats(request_id="r", model="m", engine="inferos", start_unix=now, end_unix=now, prompt_n=5,
                          cache_n=0, predicted_n=1, prompt_ms=1.0, ttft_s=0.01, predicted_ms=None,
                          predicted_per_second=None, prompt_per_second=None, latency_s=0.01, finish_reason="stop",
                          baseline=baseline, error=error, error_kind=error_kind if error else None)


def test_a_device_this_build_lacks_changes_the_device_only_and_says_so(tmp_path):
    controller = Controller(history_path=tmp_path / "h.jsonl")
    controller.update_policy({"scheduler": {"mode": "gpu_only"}, "kv": {"recent_window": 32}})  # DirectML: absent
    plan = controller.kv_plan()
    assert plan.recent_window == 32 and abs(plan.int8_below - 0.7) < 1e-9   # the configured plan, untouched
    document = controller.policy_document()
    overrides = {o["field"]: o for o in document["overrides"]}
    assert overrides["scheduler.prefill_device"]["effective"] == "cpu"
    assert "not in this onnxruntime build" in overrides["scheduler.prefill_device"]["reason"]
    assert document["effective"]["kv"] == document["configured"]["kv"]
    assert controller.session_policy().devices == ["cpu"]


def test_a_device_lost_while_serving_makes_the_kv_plan_conservative_until_its_backoff_ends(tmp_path):
    controller = Controller(history_path=tmp_path / "h.jsonl")
    controller.update_policy({"kv": {"recent_window": 32}})
    controller.fallbacks.device_error(["dml", "cpu"], "DmlExecutionProvider: device removed")
    plan = controller.kv_plan()
    assert plan.recent_window == 128 and abs(plan.int8_below - 0.8) < 1e-9
    fields = {o["field"]: o["source"] for o in controller.policy_document()["overrides"]}
    assert fields["kv.recent_window"] == "device_error" and fields["kv.level_thresholds.L1_int8"] == "device_error"
    assert controller.history.entries(kind="fallback")[-1]["event"] == "device_lost"
    controller.fallbacks.backoffs["device_error"].until = 0   # the backoff elapsed: the device is tried again
    controller.fallbacks.check_devices()
    assert controller.kv_plan().recent_window == 32


def test_per_reason_backoff_follows_the_design_documents_strategies():
    from lemonade_inferos.controller.fallbacks import default_backoffs

    backoffs = default_backoffs()
    assert (backoffs["device_error"].initial_s, backoffs["device_error"].max_s) == (5.0, 300.0)
    timeout = backoffs["timeout"]
    delays = [timeout.next_delay() for _ in range(8)]
    assert delays[0] == 3.0 and delays[1] > 3.0 * 2.2 and max(delays) <= 180.0 * 1.3
    timeout.reset()
    assert timeout.next_delay() == 3.0


def test_repeated_fallbacks_notify_with_severity_and_a_bounded_log(tmp_path):
    from lemonade_inferos.controller.fallbacks import NotificationLog
    from lemonade_inferos.config.settings import Notifications

    log_path = tmp_path / "logs" / "fallback_notifications.log"
    notes = NotificationLog(Notifications(max_log_bytes=4096), log_path)
    assert notes.record("timeout", {}) is None and notes.record("timeout", {}) is None
    third = notes.record("timeout", {"request": "r3"})
    assert third["severity"] == "warning" and third["count"] == 3 and "timeout" in third["recommended_action"]
    notes.record("backend_error", {})
    fifth = notes.record("timeout", {})
    assert fifth["severity"] == "critical" and fifth["fallbacks_in_window"] == 5   # 5 in 5 minutes
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [n["count"] for n in lines] == [3, 4] and lines[-1]["severity"] == "critical"
    for _ in range(60):
        notes.record("timeout", {"padding": "x" * 200})
    assert log_path.stat().st_size < 4096 + 2048 and log_path.with_name(log_path.name + ".1").exists()


def test_memory_pressure_compresses_harder_and_recovers(tmp_path):
    controller = Controller(history_path=tmp_path / "h.jsonl", memory_limit_bytes=1)  # any RSS is over the limit
    controller.update_policy({"scheduler": {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cpu"}})
    plan = controller.kv_plan()
    assert controller.fallbacks.memory_pressure and plan.pressure == 1.0
    assert plan.recent_window == 32 and abs(plan.int8_below - 0.6) < 1e-9
    controller.memory_limit_bytes = 10**15
    controller.kv_plan()
    assert controller.fallbacks.memory_pressure   # held for its backoff (1 s): no flapping
    controller.fallbacks.backoffs["memory_pressure"].until = 0
    controller.kv_plan()
    assert not controller.fallbacks.memory_pressure
    assert [e["event"] for e in controller.history.entries(kind="fallback")] == ["memory_pressure",
                                                                                  "memory_recovered"]


def test_backend_error_puts_requests_on_baseline_with_backoff(tmp_path):
    plugin = InferosPlugin({"control_api": False, "history_path": str(tmp_path / "h.jsonl")})
    context = InferenceContext(request_id="r", model="m", model_path="/nowhere", prompt_ids=[1, 2], max_tokens=4)
    assert not plugin.pre_run(context).baseline
    plugin.post_run(context, None, _stats(error="RuntimeError('boom')"), None)
    assert plugin.pre_run(context).baseline
    first_delay = plugin.controller.fallbacks.baseline_until - time.time()
    plugin.post_run(context, None, _stats(error="RuntimeError('boom')"), None)
    assert plugin.controller.fallbacks.baseline_until - time.time() > first_delay  # exponential backoff
    plugin.controller.fallbacks.baseline_until = 0
    plugin.post_run(context, None, _stats(), None)
    assert not plugin.pre_run(context).baseline
    events = [e["event"] for e in plugin.controller.history.entries(kind="fallback")]
    assert events[-3:] == ["backend_error", "backend_error", "backend_recovered"]


def test_memory_pressure_gives_back_the_warm_caches_first(tmp_path, ort_engine):
    plugin = InferosPlugin({"control_api": False, "history_path": str(tmp_path / "h.jsonl"),
                            "prefix_spill_mb": 0})
    prompt = list(range(1000, 1100))
    context = InferenceContext(request_id="a", model="m", model_path="/m", prompt_ids=prompt, max_tokens=2)
    cache = plugin.make_cache(context, plugin.pre_run(context), ort_engine)
    ort_engine.forward(prompt, cache)
    plugin.post_run(context, None, _stats(), cache)
    assert plugin.warm.stats()["caches"] == 1 and getattr(cache, "engine", None) is None  # kept, without the engine
    plugin.controller.memory_limit_bytes = 1  # any RSS is over the limit now
    follow_up = InferenceContext(request_id="b", model="m", model_path="/m", prompt_ids=prompt + [5], max_tokens=2)
    plan = plugin.pre_run(follow_up)
    assert plugin.warm.stats()["caches"] == 0
    restored = plugin.make_cache(follow_up, plan, ort_engine)
    assert restored is not cache and restored.num_tokens == 96  # the prefix store still serves the prompt
