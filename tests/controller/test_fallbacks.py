from __future__ import annotations

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


def test_missing_provider_falls_back_to_cpu_with_conservative_thresholds(tmp_path):
    controller = Controller(history_path=tmp_path / "h.jsonl")
    controller.update_policy({"scheduler": {"mode": "gpu_only"}})   # asks for DirectML, absent here
    plan = controller.kv_plan()
    assert controller.fallbacks.device_missing == ["dml"]
    assert plan.recent_window >= 128 and abs(plan.int8_below - 0.8) < 1e-9
    events = controller.history.entries(kind="fallback")
    assert events[-1]["event"] == "device_missing"


def test_memory_pressure_compresses_harder_and_recovers(tmp_path):
    controller = Controller(history_path=tmp_path / "h.jsonl", memory_limit_bytes=1)  # any RSS is over the limit
    controller.update_policy({"scheduler": {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cpu"}})
    plan = controller.kv_plan()
    assert controller.fallbacks.memory_pressure and plan.pressure == 1.0
    assert plan.recent_window == 32 and abs(plan.int8_below - 0.6) < 1e-9
    controller.memory_limit_bytes = 10**15
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
