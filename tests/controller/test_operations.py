"""The controller's operations: the request's own asks, the quality scheduler, the loops, and the host's
generic pass-through of plugin options."""

from __future__ import annotations

import time
from datetime import datetime

import click
import pytest

from lemonade_inferos.cli.lemonade_server import plugin_options
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.controller.schedule import EvaluationSchedule, next_daily
from lemonade_inferos.hooktypes import InferenceContext
from lemonade_inferos.kvcache.stats import KVStats
from lemonade_inferos.plugin import InferosPlugin
from lemonade_inferos.config.settings import QualitySchedule


def _plugin(tmp_path, **options):
    return InferosPlugin({"control_api": "false", "history_path": str(tmp_path / "h.jsonl"), **options})


def _context(**asks):
    return InferenceContext(request_id=f"r{time.perf_counter_ns()}", model="m", model_path="/m",
                            prompt_ids=list(range(300)), max_tokens=4, **asks)


def test_a_zero_quality_budget_runs_the_request_without_quantization(tmp_path):
    plugin = _plugin(tmp_path)
    plan = plugin.pre_run(_context(quality_budget=0.0))
    record = plugin._records[next(iter(plugin._records))]
    assert not record.kv_plan.quantizes and record.kv_plan.live_kv == "model"
    assert "no quantization" in plan.notes["quality_budget"]


def test_a_quality_budget_under_the_online_estimate_turns_int4_off_for_that_request(tmp_path):
    from lemonade_inferos.controller.guard import ShadowSample

    plugin = _plugin(tmp_path)
    for _ in range(3):
        plugin.controller.guard._samples.append(ShadowSample(nll_plan=2.1, nll_fp=2.0, tokens=100))
    plan = plugin.pre_run(_context(quality_budget=0.05))
    record = list(plugin._records.values())[-1]
    assert record.kv_plan.int4_below < 0 and "no INT4" in plan.notes["quality_budget"]


def test_target_ttft_picks_the_model_dtype_when_int8_prefill_would_miss_it(tmp_path):
    from tests.controller.test_fallbacks import _stats

    plugin = _plugin(tmp_path)
    slow = _stats()
    slow.prompt_n, slow.cache_n, slow.prompt_per_second, slow.kv = 1000, 0, 500.0, KVStats(live_form="int8")
    plugin.controller.recorder.record(slow)
    plugin.pre_run(_context(target_ttft_ms=100.0))                      # 300 tokens at 500 tok/s: 600 ms
    assert list(plugin._records.values())[-1].kv_plan.live_kv == "model"
    plugin.pre_run(_context(target_ttft_ms=5000.0))
    assert list(plugin._records.values())[-1].kv_plan.live_kv == "int8"


def test_a_batch_size_above_one_is_reported_not_applied(tmp_path):
    plan = _plugin(tmp_path).pre_run(_context(batch_size=4))
    assert plan.notes["batch_size"].startswith("not applied")


def test_the_policy_document_shows_the_last_requests_own_overrides_with_their_reasons(tmp_path):
    from tests.controller.test_fallbacks import _stats

    plugin = _plugin(tmp_path)
    context = _context(batch_size=4, quality_budget=0.0)
    plan = plugin.pre_run(context)
    stats = _stats()
    stats.request_id = context.request_id
    plugin.post_run(context=context, plan=plan, stats=stats, cache=None)
    shown = {o["field"]: o for o in plugin.controller.policy_document()["last_request_overrides"]}
    assert set(shown) == {"batch_size", "kv.mode", "kv.live_format"}
    assert shown["kv.mode"]["source"] == "request" and "no quantization" in shown["kv.mode"]["reason"]


def test_the_quality_scheduler_plans_daily_full_and_periodic_light_evaluations():
    now = [datetime(2026, 12, 1, 5, 0).timestamp()]
    schedule = EvaluationSchedule(QualitySchedule(full_at="06:00", light_every_h=4), clock=lambda: now[0])
    assert schedule.next["full"] == datetime(2026, 12, 1, 6, 0).timestamp()
    assert schedule.due() == []
    now[0] = datetime(2026, 12, 1, 6, 0, 30).timestamp()
    assert schedule.due() == [("full", 512)] and schedule.next["full"] == datetime(2026, 12, 2, 6, 0).timestamp()
    now[0] = datetime(2026, 12, 1, 9, 1).timestamp()
    assert schedule.due() == [("light", 128)]
    assert next_daily("06:00", datetime(2026, 12, 1, 6, 0).timestamp()) == datetime(2026, 12, 2, 6, 0).timestamp()


def test_due_evaluations_run_through_the_runner_and_report_iso_times(tmp_path):
    ran = []

    class Owner:  # the plugin's side of the controller: only the evaluation is asked for here
        def full_evaluation(self, context):
            ran.append(context)
            return {"delta_ppl": 0.01, "ppl_fp": 10.0, "ppl": 10.01, "kld": 0.001, "top1": 0.99, "plan": "dynamic"}

        def busy(self):
            return True

        def prefix_stats(self):
            return {}

        def kv_memory(self):
            return None

    controller = Controller(history_path=tmp_path / "h.jsonl", owner=Owner())
    controller.schedule.next["light"] = time.time() - 1
    controller.run_due_evaluations()
    deadline = time.time() + 5
    while controller.light_evaluation.get("status") != "within_threshold" and time.time() < deadline:
        time.sleep(0.02)
    light = controller.metrics()["quality"]["light_evaluation"]
    assert ran == [128] and light["status"] == "within_threshold"
    assert light["last_run"].endswith("Z") and light["next_scheduled"].endswith("Z")
    assert controller.metrics()["quality"]["full_evaluation"]["next_scheduled"].endswith("Z")


def test_the_loops_run_their_tasks_at_the_configured_periods(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("infer_os:\n  loops: {fast_ms: 5, mid_ms: 20, slow_ms: 50}\n")
    controller = Controller(config_path=path, history_path=tmp_path / "h.jsonl")
    controller.start()
    try:
        deadline = time.time() + 10
        while controller.loops.status()["slow"]["rounds"] < 5 and time.time() < deadline:
            time.sleep(0.05)
        status = controller.loops.status()
    finally:
        controller.stop()
    assert status["fast"]["tasks"] == ["memory_pressure"] and "thread_policy" in status["mid"]["tasks"]
    assert {"config_files", "quality_schedule", "history_snapshot"} <= set(status["slow"]["tasks"])
    assert status["fast"]["rounds"] > status["mid"]["rounds"] > status["slow"]["rounds"] >= 5
    assert status["fast"]["period_ms"] == 5 and status["slow"]["errors"] == 0


def test_a_watching_loop_whose_tasks_cost_more_than_its_period_waits_longer_but_the_slow_loop_keeps_its_period():
    from lemonade_inferos.controller.loops import MAX_DUTY, ControllerLoops

    def burn_2ms() -> None:
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    loops = ControllerLoops(lambda: {"fast": 0.001, "mid": 0.001, "slow": 0.001})
    loops.add("fast", "burn", burn_2ms)
    loops.add("mid", "cheap", lambda: None)
    loops.add("slow", "burn", burn_2ms)   # a reload or a due evaluation: scheduled work, never stretched
    loops.start()
    try:
        time.sleep(1.0)
        status = loops.status()
    finally:
        loops.stop()
    # 2 ms of CPU a round at 1% of a core: one round per 0.2 s, not one per millisecond
    capped_rounds = 1.0 / (0.002 / MAX_DUTY) + 2
    assert 2 <= status["fast"]["rounds"] <= capped_rounds
    assert status["fast"]["last_wait_ms"] >= 0.002 / MAX_DUTY * 1000 * 0.9
    assert status["mid"]["rounds"] > 10 * capped_rounds
    # the slow loop burns as much per round as the fast one but is never stretched: it runs many times the cap
    assert status["slow"]["rounds"] > 10 * capped_rounds and status["slow"]["max_duty"] is None


def test_the_host_passes_plugin_options_through_without_knowing_them():
    options = plugin_options(("inferos",), ("inferos.kv.mode=dynamic",),
                             ["--inferos-prefix-cache-mb", "64", "--inferos-warm-caches=0"], None)
    assert options == {"inferos": {"kv.mode": "dynamic", "prefix_cache_mb": "64", "warm_caches": "0"}}
    with pytest.raises(click.UsageError, match="no such option"):
        plugin_options(("inferos",), (), ["--prefix-cache-mb", "64"], None)
    with pytest.raises(click.UsageError, match="needs a value"):
        plugin_options(("inferos",), (), ["--inferos-prefix-cache-mb"], None)


def test_inferos_log_level_sets_the_plugins_loggers_only(tmp_path, monkeypatch):
    import logging

    monkeypatch.setenv("INFEROS_LOG_LEVEL", "DEBUG")
    try:
        _plugin(tmp_path)
        assert logging.getLogger("lemonade_inferos.kvcache").level == logging.DEBUG
        assert logging.getLogger("lemonade_inferos.host").level == logging.NOTSET
    finally:
        monkeypatch.delenv("INFEROS_LOG_LEVEL")
        _plugin(tmp_path)
    assert logging.getLogger("lemonade_inferos.kvcache").level == logging.NOTSET


def test_inferos_enabled_false_makes_the_plugin_step_aside(tmp_path, monkeypatch):
    from lemonade_inferos.plugins import PluginDisabled

    monkeypatch.setenv("INFEROS_ENABLED", "false")
    with pytest.raises(PluginDisabled, match="INFEROS_ENABLED"):
        _plugin(tmp_path)
