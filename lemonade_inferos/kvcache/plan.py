"""KV plans: the concrete rules a policy's ``kv`` section turns into.

Tiers: L0 full precision (the model's KV dtype), L1 INT8, L2 INT4, L3 evicted.
Importance is a per-layer rank in [0, 1] (1 = most important). A sealed block
whose importance is below ``int8_below`` goes to INT8; below ``int4_below`` to
INT4 when pressure exceeds ``int4_pressure``. When pressure exceeds
``evict_pressure`` the least important blocks are evicted until ``evict_below``
of the sealed history is gone (the bottom ``evict_below`` share, never more).
Demotion is one-way.

Live form (``live_kv``): ``model`` keeps the working buffer in the model's KV
dtype; ``int8`` runs the request on the INT8 live form (``engine/live_forms.py``),
where every held token is INT8 and the plan's INT8 rule is met by construction.
Plan names for ``inferos eval ppl`` take the prefix ``live8:`` for it
(``live8:fp``, ``live8:dynamic@0.6``).

Modes (policy ``kv.mode``):

| mode | INT8 below | INT4 below (pressure >) | evict below (pressure >) | window |
|---|---|---|---|---|
| dynamic | L1_int8 | L2_int4 (0.6) | L3_evict (0.8) | recent_window |
| quality_optimized | L1_int8 | never | L3_evict (0.95) | max(recent_window, 128) |
| latency_optimized | L1_int8 | L2_int4 (0.6) | L3_evict (0.6) | recent_window |
| throughput_optimized | 1.0 (all history) | L2_int4 (0.0) | L3_evict (0.6) | recent_window |
| disabled | never | never | never (context full is an error) | all |
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

NEVER = -1.0          # a threshold no rank is below
ALWAYS = 1.01         # a threshold every rank is below
NO_PRESSURE_GATE = -1.0

TIER_L0, TIER_INT8, TIER_INT4, TIER_EVICTED = 0, 1, 2, 3
TIER_NAMES = {TIER_L0: "L0", TIER_INT8: "L1_int8", TIER_INT4: "L2_int4", TIER_EVICTED: "L3_evicted"}

LIVE_INT8_PREFIX = "live8:"

KVMode = Literal["dynamic", "latency_optimized", "throughput_optimized", "quality_optimized", "disabled"]


@dataclass(frozen=True)
class KVPlan:
    """What the tiered cache does with blocks that leave the recent window."""

    name: str = "dynamic"
    sink_tokens: int = 4
    recent_window: int = 64
    block_size: int = 32
    group_size: int = 32
    int8_below: float = 0.7
    int4_below: float = 0.5
    int4_pressure: float = 0.6
    evict_below: float = 0.3
    evict_pressure: float = 0.8
    importance: Literal["key_norm", "inverse_key_norm", "recency", "attention"] = "key_norm"
    pressure: float = 0.0   # external memory pressure in [0, 1], set by the controller
    live_kv: Literal["model", "int8"] = "model"
    segment_recompute: float | None = None   # segment reuse on, recomputing this share at a seam (segments.py)

    def __post_init__(self) -> None:
        if self.block_size & (self.block_size - 1) or not 8 <= self.block_size <= 256:
            raise ValueError(f"block_size must be a power of two in 8..256, got {self.block_size}")
        if not 16 <= self.recent_window <= 512 and self.name not in ("fp", "disabled"):
            raise ValueError(f"recent_window must be in 16..512, got {self.recent_window}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.live_kv not in ("model", "int8"):
            raise ValueError(f"live_kv must be model or int8, got {self.live_kv!r}")

    @property
    def quantizes(self) -> bool:
        return self.int8_below > 0 or self.int4_below > 0

    @property
    def evicts(self) -> bool:
        return self.evict_below > 0

    def with_pressure(self, pressure: float) -> "KVPlan":
        return replace(self, pressure=max(0.0, min(1.0, pressure)))


def plan_for_mode(mode: KVMode, recent_window: int = 64, l1_int8: float = 0.7, l2_int4: float = 0.5,
                  l3_evict: float = 0.3, sink_tokens: int = 4) -> KVPlan:
    """The plan a policy's ``kv`` section selects (see the table in this module's docstring)."""
    common = dict(sink_tokens=sink_tokens, recent_window=recent_window)
    if mode == "dynamic":
        return KVPlan("dynamic", int8_below=l1_int8, int4_below=l2_int4, evict_below=l3_evict, **common)
    if mode == "quality_optimized":
        return KVPlan("quality_optimized", int8_below=l1_int8, int4_below=NEVER, evict_below=l3_evict,
                      evict_pressure=0.95, sink_tokens=sink_tokens, recent_window=max(recent_window, 128))
    if mode == "latency_optimized":
        return KVPlan("latency_optimized", int8_below=l1_int8, int4_below=l2_int4, evict_below=l3_evict,
                      evict_pressure=0.6, **common)
    if mode == "throughput_optimized":
        return KVPlan("throughput_optimized", int8_below=ALWAYS, int4_below=l2_int4, int4_pressure=NO_PRESSURE_GATE,
                      evict_below=l3_evict, evict_pressure=0.6, **common)
    if mode == "disabled":
        return KVPlan("disabled", int8_below=NEVER, int4_below=NEVER, evict_below=NEVER, **common)
    raise ValueError(f"unknown kv.mode '{mode}'; choose dynamic, latency_optimized, throughput_optimized, "
                     "quality_optimized or disabled")


def named_plan(name: str, recent_window: int = 64, sink_tokens: int = 4) -> KVPlan:
    """Plans by name for ``inferos eval ppl --kv``: fp, int8, int4, dynamic, streaming, or a kv.mode."""
    common = dict(sink_tokens=sink_tokens, recent_window=recent_window)
    plans = {
        "fp": KVPlan("fp", int8_below=NEVER, int4_below=NEVER, evict_below=NEVER, **common),
        "int8": KVPlan("int8", int8_below=ALWAYS, int4_below=NEVER, evict_below=NEVER, **common),
        "int4": KVPlan("int4", int8_below=ALWAYS, int4_below=ALWAYS, int4_pressure=NO_PRESSURE_GATE,
                       evict_below=NEVER, **common),
        # INT4 with 64-token blocks and groups of 64 (4.5 bits a value with its fp16 scale and minimum, against 5
        # at 32): the leanest at-rest plan without eviction; for evaluation (the prefix store's grid is 32 tokens)
        "int4-g64": KVPlan("int4-g64", int8_below=ALWAYS, int4_below=ALWAYS, int4_pressure=NO_PRESSURE_GATE,
                           evict_below=NEVER, block_size=64, group_size=64, **common),
        "streaming": KVPlan("streaming", int8_below=NEVER, int4_below=NEVER, evict_below=ALWAYS,
                            evict_pressure=NO_PRESSURE_GATE, **common),
    }
    if name in plans:
        return plans[name]
    try:
        return plan_for_mode(name, recent_window=recent_window, sink_tokens=sink_tokens)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"unknown KV plan '{name}'; choose one of {sorted(plans) + ['dynamic', 'quality_optimized', 'latency_optimized', 'throughput_optimized', 'disabled']}") from None


def make_plan(name: str, recent_window: int, pressure: float, default_signal: str = "attention") -> KVPlan:
    """A named plan; suffixes ``@P`` set the memory pressure (``dynamic@0.9``) and ``-attention``/``-keynorm``/
    ``-recency``/``-inverse`` the importance signal, which is otherwise ``default_signal`` (the server's default,
    attention, where the engine has attention probes)."""
    base, _, at = name.partition("@")
    live = "model"
    if base.startswith(LIVE_INT8_PREFIX):
        base, live = base[len(LIVE_INT8_PREFIX):], "int8"
    signal = default_signal
    for suffix, alt in (("-inverse", "inverse_key_norm"), ("-recency", "recency"), ("-attention", "attention"),
                        ("-keynorm", "key_norm")):
        if base.endswith(suffix):
            base, signal = base[: -len(suffix)], alt
    plan = named_plan(base, recent_window=recent_window)
    return replace(plan, name=name, importance=signal, pressure=float(at) if at else pressure, live_kv=live)


def needs_attention_probe(plans: list[str]) -> bool:
    """Whether any of these plans ranks blocks by attention (the engine must then be loaded with probes)."""
    return any(make_plan(p, 64, 0.0).importance == "attention" for p in plans)


def build_plans(plans: list[str | KVPlan], recent_window: int, pressure: float, has_probe: bool) -> list[KVPlan]:
    """Plans by name (ranked by attention where the engine has attention probes, by key norm otherwise) or as
    given; a plan ranking by attention on an engine without probes is refused."""
    default_signal = "attention" if has_probe else "key_norm"
    built = [p if isinstance(p, KVPlan) else make_plan(p, recent_window, pressure, default_signal) for p in plans]
    for plan in built:
        if plan.importance == "attention" and not has_probe:
            raise ValueError(f"plan {plan.name} ranks blocks by attention, but the engine has no attention probe: "
                             "load it with SessionPolicy(attention_probe=True)")
    return built
