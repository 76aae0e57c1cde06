"""The planner: everything one request runs with, decided in one place, as one frozen :class:`RequestPlan`.

Before, a request's plan was made in three steps after the effective policy (the controller re-applied the
guard's rules to the KV plan, then the plugin applied the request's own asks and halved the prefix store's budget
under pressure), and only the first step said why. Here :func:`plan` is a pure function of the request and a
:class:`PlanState` the controller measures just before it; every change from the configured policy is an
:class:`~lemonade_inferos.controller.effective.Override` with its reason: the effective policy's (devices, memory
pressure, device errors, the quality guard, the thread policy: ``effective.py``) and the request's own (its
quality budget, its target TTFT, its batch size, its chat's drafting, the prefix store's budget under pressure).
``/v1/policy`` shows the effective ones, a request's plan notes and telemetry span all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lemonade_inferos.controller.effective import EffectivePolicy, Override
from lemonade_inferos.config.policy import Policy
from lemonade_inferos.engine.session import PhaseOverrides, SessionPolicy
from lemonade_inferos.engine.speculative import SpeculationConfig
from lemonade_inferos.hooktypes import InferenceContext
from lemonade_inferos.kvcache.plan import NEVER, TIER_INT8, KVPlan, plan_for_mode


@dataclass(frozen=True)
class PlanState:
    """What a plan depends on besides the request, measured by the controller just before it."""

    effective: EffectivePolicy
    importance: str                        # the signal blocks are ranked by (attention needs the probe graph)
    max_tier: int                          # the quality guard's cap on block tiers
    evictions_allowed: bool                # the quality guard's last steps keep every block
    prefix_budget_bytes: int               # the prefix store's configured budget
    quality_estimate: float | None = None  # the online ΔPPL estimate of the current plan
    int8_prefill_rate: float | None = None  # measured INT8 live-form prefill, tokens/s
    chat_acceptance: float | None = None   # this chat's last turn's drafting acceptance


@dataclass(frozen=True)
class RequestPlan:
    """What one request runs with. ``overrides``: the effective policy's, then this request's own."""

    effective: EffectivePolicy
    kv_plan: KVPlan
    session: SessionPolicy
    run_options: dict[str, str]
    speculation: SpeculationConfig
    prefix_budget_bytes: int
    keep_warm: bool                        # the finished cache is kept live for the next turn
    overrides: tuple[Override, ...] = ()
    asks: dict[str, str] = field(default_factory=dict)   # the request's own asks, each with what became of it

    @property
    def request_overrides(self) -> tuple[Override, ...]:
        return self.overrides[len(self.effective.overrides):]

    def notes(self) -> dict[str, Any]:
        """For RunPlan.notes (and so the telemetry span): each ask's outcome, every override's field."""
        return {**self.asks, "overrides": [o.field for o in self.overrides],
                "pressure": self.kv_plan.pressure, "num_draft_tokens": self.speculation.num_draft_tokens}


def plan(context: InferenceContext, state: PlanState) -> RequestPlan:
    """The plan for ``context`` under ``state``."""
    overrides: list[Override] = []
    asks: dict[str, str] = {}
    kv = _with_asks(context, kv_plan(state), state, overrides, asks)
    if context.batch_size != 1:
        asks["batch_size"] = f"not applied: one sequence per generation (asked {context.batch_size})"
        overrides.append(Override("batch_size", context.batch_size, 1, "not_applied", asks["batch_size"]))
    effective = state.effective
    under_pressure = effective.state.memory_pressure
    budget = state.prefix_budget_bytes // (2 if under_pressure else 1)
    if under_pressure:
        overrides.append(Override("prefix_cache_mb", state.prefix_budget_bytes / 2**20, budget / 2**20,
                                  "memory_pressure", "memory pressure: the prefix store keeps half its budget and "
                                  "no live cache is kept warm"))
    return RequestPlan(effective, kv, session_policy(effective, state.importance), run_options(effective.policy),
                       _speculation(effective.policy, state.chat_acceptance, overrides), budget,
                       keep_warm=not under_pressure, overrides=effective.overrides + tuple(overrides), asks=asks)


def kv_plan(state: PlanState) -> KVPlan:
    """The effective policy's KV plan under the quality guard's cap, before any request's asks."""
    kv = state.effective.policy.kv
    t = kv.level_thresholds
    plan_ = plan_for_mode(kv.mode, recent_window=min(kv.recent_window, 512), l1_int8=t.L1_int8,
                          l2_int4=t.L2_int4, l3_evict=t.L3_evict)
    if not state.evictions_allowed:
        plan_ = replace(plan_, evict_below=NEVER)
    # INT8 live while the plan quantizes and the guard allows INT8; its "no quantization" and "full precision"
    # steps (and kv.mode disabled) run on the model's own KV dtype
    live = kv.live_format if plan_.quantizes and state.max_tier >= TIER_INT8 else "model"
    segments = kv.segment_recompute if kv.segment_reuse else None   # the guard's steps turn it off
    return replace(plan_, pressure=state.effective.state.pressure, importance=state.importance, live_kv=live,
                   segment_recompute=segments)


def session_policy(effective: EffectivePolicy, importance: str) -> SessionPolicy:
    """Session options per phase; spinning follows the measured load unless the scheduler fixes it."""
    policy = effective.policy
    scheduler, io = policy.scheduler, policy.io
    prefill = SessionPolicy(
        devices=list(dict.fromkeys([effective.prefill_device, "cpu"])), enable_iobinding=io.enable_iobinding,
        intra_op_num_threads=scheduler.prefill.intra_op_num_threads,
        allow_spinning=_spin(scheduler.prefill.allow_spinning, effective.allow_spinning),
        dml_pool_bytes=io.dml_pool_bytes,  # reported not applied where it cannot act (engine/session.py)
        host_pool_bytes=io.host_pool_bytes, attention_probe=importance == "attention",
        kv_cache=policy.kv.live_format)
    decode = PhaseOverrides(devices=list(dict.fromkeys([effective.decode_device, "cpu"])),
                            intra_op_num_threads=scheduler.decode.intra_op_num_threads,
                            allow_spinning=_spin(scheduler.decode.allow_spinning, effective.allow_spinning))
    hybrid = prefill.model_copy(update={"decode": decode})
    return hybrid if hybrid.hybrid else prefill


def run_options(policy: Policy) -> dict[str, str]:
    entries = dict(policy.io.run_config)
    if policy.io.arena_shrinkage:
        entries["memory.enable_memory_arena_shrinkage"] = "cpu:0"
    return entries


def speculation(policy: Policy, num_draft_tokens: int | None = None) -> SpeculationConfig:
    """The policy's ``speculative`` section (``num_draft_tokens`` instead of the policy's when given), enforcing
    ``quality.min_accept_rate``."""
    settings = policy.speculative.model_dump()
    if num_draft_tokens:
        settings["num_draft_tokens"] = num_draft_tokens
    return SpeculationConfig(**settings, min_accept_rate=policy.quality.min_accept_rate)


def _speculation(policy: Policy, acceptance: float | None, overrides: list[Override]) -> SpeculationConfig:
    """A chat whose last turn accepted less than ``quality.min_accept_rate`` of its drafts starts with shorter
    drafts, in proportion (the acceptance watch does the rest)."""
    tokens, target = policy.speculative.num_draft_tokens, policy.quality.min_accept_rate
    if acceptance is None or target <= 0 or acceptance >= target:
        return speculation(policy)
    shorter = max(1, int(tokens * acceptance / target))
    if shorter != tokens:
        overrides.append(Override("speculative.num_draft_tokens", tokens, shorter, "chat_acceptance",
                                  f"this chat's last turn accepted {acceptance:.0%} of its drafts "
                                  f"(< quality.min_accept_rate {target:g})"))
    return speculation(policy, shorter)


def _with_asks(context: InferenceContext, kv: KVPlan, state: PlanState, overrides: list[Override],
               asks: dict[str, str]) -> KVPlan:
    """The request's ``quality_budget`` and ``target_ttft_ms`` acting on its KV plan."""
    budget = context.quality_budget
    if budget is not None and kv.quantizes:
        estimate = state.quality_estimate
        if budget <= 0:
            asks["quality_budget"] = "0: no quantization for this request"
            overrides.append(Override("kv.mode", kv.name, "disabled", "request", asks["quality_budget"]))
            if kv.live_kv != "model":
                overrides.append(Override("kv.live_format", kv.live_kv, "model", "request", asks["quality_budget"]))
            kv = replace(plan_for_mode("disabled"), pressure=kv.pressure, importance=kv.importance, live_kv="model")
        elif estimate is not None and estimate > budget:
            asks["quality_budget"] = f"{budget} < the online ΔPPL estimate {estimate:.3f}: no INT4"
            overrides.append(Override("kv.int4", "by level thresholds", "never", "request", asks["quality_budget"]))
            kv = replace(kv, int4_below=NEVER)
        else:
            asks["quality_budget"] = f"{budget}: the plan's estimate is within it"
    if context.target_ttft_ms is not None and kv.live_kv == "int8":
        asks["target_ttft_ms"] = _ttft_choice(len(context.prompt_ids), context.target_ttft_ms, state.int8_prefill_rate)
        if asks["target_ttft_ms"].startswith("model"):
            overrides.append(Override("kv.live_format", "int8", "model", "request", asks["target_ttft_ms"]))
            kv = replace(kv, live_kv="model")
    return kv


def _ttft_choice(prompt_tokens: int, target_ms: float, rate: float | None) -> str:
    """A request whose target TTFT the measured INT8 prefill rate would miss runs its KV in the model's dtype."""
    if rate is None:
        return "int8: no INT8 prefill measured yet"
    expected_ms = prompt_tokens / rate * 1000
    if expected_ms > target_ms:
        return f"model: INT8 prefill would take ~{expected_ms:.0f} ms > {target_ms:g} ms"
    return f"int8: ~{expected_ms:.0f} ms is within {target_ms:g} ms"


def _spin(configured: bool | None, thread_policy: bool) -> bool:
    return thread_policy if configured is None else configured
