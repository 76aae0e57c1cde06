"""The quality guard: unit behaviour, and a trip provoked by an aggressive plan on the real model."""

from __future__ import annotations

import random
from dataclasses import replace

from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.controller.guard import QualityGuard, ShadowSample
from lemonade_inferos.controller.shadow import shadow_score
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0, named_plan
from lemonade_inferos.kvcache.rope import RopeTables


def _guard(limit=0.1, **options):
    events = []
    settings = dict(window_size=2, trip_windows=2, quiet_s=0.0, backoff_s=0.0, rng=random.Random(0))
    guard = QualityGuard(lambda: limit, events.append, **{**settings, **options})
    return guard, events


def _bad():
    return ShadowSample(nll_plan=2.6, nll_fp=2.5, tokens=100)   # ΔPPL ~ 1.3


def _good():
    return ShadowSample(nll_plan=2.5001, nll_fp=2.5, tokens=100)


def test_guard_steps_back_after_consecutive_bad_windows_only():
    guard, events = _guard(quiet_s=3600)
    for sample in (_bad(), _bad()):
        guard.add(sample)
    assert guard.level == 0  # one bad window is not enough
    for sample in (_bad(), _bad()):
        guard.add(sample)
    assert guard.level == 1 and guard.max_tier == TIER_INT8
    assert events[-1]["from_level"] == 0 and events[-1]["to_level"] == 1 and "ΔPPL" in events[-1]["reason"]


def test_guard_keeps_stepping_back_to_full_precision():
    guard, _ = _guard(quiet_s=3600)
    for _ in range(12):
        guard.add(_bad())
    assert guard.level == 3 and guard.max_tier == TIER_L0 and not guard.evictions_allowed


def test_guard_relaxes_after_a_quiet_period():
    guard, events = _guard(quiet_s=0.0)
    for _ in range(4):
        guard.add(_bad())
    assert guard.level == 1
    guard.add(_good())
    guard.add(_good())
    assert guard.level == 0 and events[-1]["to_level"] == 0


def test_backoff_delays_the_next_step():
    guard, _ = _guard(quiet_s=3600, backoff_s=60.0)
    for _ in range(4):
        guard.add(_bad())
    assert guard.level == 1
    for _ in range(8):
        guard.add(_bad())
    assert guard.level == 1  # still backing off


def test_an_aggressive_plan_trips_the_guard_on_the_real_model_and_it_recovers(ort_engine, corpus_ids, tmp_path):
    controller = Controller(history_path=tmp_path / "history.jsonl",
                            guard_options=dict(window_size=1, trip_windows=1, quiet_s=0.0, backoff_s=0.0))
    controller.update_policy({"quality": {"max_delta_ppl": 0.02}})
    rope = RopeTables.from_onnx(ort_engine.folder.onnx_path)
    aggressive = replace(named_plan("int4", recent_window=16), group_size=64, block_size=16)
    sample = shadow_score(ort_engine, corpus_ids[:384], aggressive, rope, controller.guard.max_tier,
                          max_tokens=384, score_tokens=256)
    assert sample.nll_plan > sample.nll_fp
    controller.add_shadow_sample(sample)
    assert controller.guard.level == 1 and controller.guard.max_tier == TIER_INT8
    # under the guard's cap the same plan only reaches INT8: the measured ΔPPL falls back under the limit
    capped = shadow_score(ort_engine, corpus_ids[:384], aggressive, rope, controller.guard.max_tier,
                          max_tokens=384, score_tokens=256)
    assert capped.nll_plan - capped.nll_fp < sample.nll_plan - sample.nll_fp
    controller.add_shadow_sample(capped)
    assert controller.guard.level == 0 and controller.guard.max_tier == TIER_INT4  # recovered after quiet
    guard_events = controller.history.entries(kind="guard")
    assert [(e["from_level"], e["to_level"]) for e in guard_events] == [(0, 1), (1, 0)]
    assert controller.metrics()["quality"]["delta_ppl_est"]["measurement"]["samples"] == 2


def test_a_shadow_pass_waits_before_every_chunk_and_is_abandoned_when_told(ort_engine, corpus_ids):
    rope = RopeTables.from_onnx(ort_engine.folder.onnx_path)
    plan = named_plan("int8", recent_window=64)
    calls = []
    sample = shadow_score(ort_engine, corpus_ids[:257], plan, rope, TIER_INT4, max_tokens=257,
                          before_chunk=lambda: calls.append(1))
    assert sample is not None and len(calls) == 4  # 256 scored positions in chunks of 64
    assert shadow_score(ort_engine, corpus_ids[:257], plan, rope, TIER_INT4, max_tokens=257,
                        before_chunk=lambda: False) is None
