"""The planner is one pure function: a request and what was measured before it -> everything the request runs with,
each change from the configured policy an Override with its reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lemonade_inferos.controller import planner
from lemonade_inferos.controller.effective import RunState, resolve
from lemonade_inferos.config.policy import Policy
from lemonade_inferos.hooktypes import InferenceContext
from lemonade_inferos.kvcache.plan import NEVER, TIER_INT4, TIER_L0

BUDGET = 256 * 2**20


def _state(policy: Policy | None = None, run: RunState | None = None, **fields) -> planner.PlanState:
    effective = resolve(policy or Policy(), run or RunState(available_providers=frozenset({"CPUExecutionProvider"})))
    return replace(planner.PlanState(effective, "attention", TIER_INT4, True, BUDGET), **fields)


def _context(**asks) -> InferenceContext:
    return InferenceContext(request_id="r", model="m", model_path="/m", prompt_ids=list(range(300)), max_tokens=4,
                            **asks)


def _fields(plan: planner.RequestPlan) -> dict[str, str]:
    return {o.field: o.source for o in plan.request_overrides}


def test_a_plain_request_runs_the_effective_policy_with_no_overrides_of_its_own():
    plan = planner.plan(_context(), _state())
    assert plan.request_overrides == () and plan.overrides == plan.effective.overrides
    assert plan.kv_plan.live_kv == "int8" and plan.kv_plan.importance == "attention"
    assert plan.prefix_budget_bytes == BUDGET and plan.keep_warm
    assert plan.session.attention_probe and plan.speculation.num_draft_tokens == Policy().speculative.num_draft_tokens


def test_the_plan_is_frozen_and_the_same_inputs_give_the_same_plan():
    state = _state()
    first, second = planner.plan(_context(quality_budget=0.0), state), planner.plan(_context(quality_budget=0.0), state)
    assert first.kv_plan == second.kv_plan and first.overrides == second.overrides
    with pytest.raises(AttributeError):
        first.keep_warm = False


def test_a_zero_quality_budget_is_two_overrides_with_the_request_as_their_source():
    plan = planner.plan(_context(quality_budget=0.0), _state())
    assert not plan.kv_plan.quantizes and plan.kv_plan.live_kv == "model"
    assert _fields(plan) == {"kv.mode": "request", "kv.live_format": "request"}
    assert "no quantization" in plan.notes()["quality_budget"]


def test_a_quality_budget_under_the_online_estimate_turns_int4_off_and_says_why():
    plan = planner.plan(_context(quality_budget=0.05), _state(quality_estimate=0.1))
    assert plan.kv_plan.int4_below == NEVER and _fields(plan) == {"kv.int4": "request"}
    within = planner.plan(_context(quality_budget=0.5), _state(quality_estimate=0.1))
    assert within.request_overrides == () and "within" in within.notes()["quality_budget"]


def test_a_target_ttft_the_measured_int8_prefill_would_miss_runs_the_model_dtype():
    slow = planner.plan(_context(target_ttft_ms=100.0), _state(int8_prefill_rate=500.0))   # 300 tokens: 600 ms
    assert slow.kv_plan.live_kv == "model" and _fields(slow) == {"kv.live_format": "request"}
    fast = planner.plan(_context(target_ttft_ms=5000.0), _state(int8_prefill_rate=500.0))
    assert fast.kv_plan.live_kv == "int8" and fast.notes()["target_ttft_ms"].startswith("int8")


def test_a_batch_size_above_one_is_an_override_reported_not_applied():
    plan = planner.plan(_context(batch_size=4), _state())
    assert _fields(plan) == {"batch_size": "not_applied"} and plan.notes()["batch_size"].startswith("not applied")


def test_a_chat_that_drafted_poorly_starts_its_next_turn_with_shorter_drafts():
    policy = Policy().merged({"speculative": {"num_draft_tokens": 8}, "quality": {"min_accept_rate": 0.5}})
    plan = planner.plan(_context(), _state(policy, chat_acceptance=0.25))
    assert plan.speculation.num_draft_tokens == 4
    assert _fields(plan) == {"speculative.num_draft_tokens": "chat_acceptance"}
    assert planner.plan(_context(), _state(policy, chat_acceptance=0.9)).speculation.num_draft_tokens == 8


def test_memory_pressure_halves_the_prefix_budget_keeps_no_warm_cache_and_says_so():
    run = RunState(available_providers=frozenset({"CPUExecutionProvider"}), memory_pressure=True, pressure=0.9)
    plan = planner.plan(_context(), _state(run=run))
    assert plan.prefix_budget_bytes == BUDGET // 2 and not plan.keep_warm
    assert _fields(plan) == {"prefix_cache_mb": "memory_pressure"}
    assert "memory_pressure" in {o.source for o in plan.effective.overrides}   # the policy's own, shown apart


def test_the_guards_last_step_runs_the_model_dtype_without_eviction():
    plan = planner.plan(_context(), _state(max_tier=TIER_L0, evictions_allowed=False))
    assert plan.kv_plan.live_kv == "model" and plan.kv_plan.evict_below == NEVER
