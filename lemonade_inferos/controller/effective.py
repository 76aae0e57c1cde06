"""The effective policy: the configured one with every active override applied, and each override's reason.

Requests run with the effective policy; ``GET /v1/policy`` shows both and the overrides between them. The
design document's fallback table decides what an event changes:

| event | what changes here |
|---|---|
| a device this onnxruntime build does not have | that phase's device only (NPU -> DML -> CPU); the KV plan stays |
| a device lost while serving (a fault on it) | CPU, and the KV thresholds made conservative (+0.1, window >= 128) |
| memory pressure | recent window halved, thresholds -0.1 |
| the quality guard stepping back | the highest tier blocks may reach (INT4 -> INT8 -> none), eviction at level 3 |
| backend errors, a stalled generation | the baseline engine for the backoff |

The thread policy's spinning decision is shown too: it changes the session, not the policy document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lemonade_inferos.config.policy import Policy
from lemonade_inferos.engine.session import DEVICE_TO_PROVIDER

SCHEDULER_DEVICES = {"gpu_only": ("dml", "dml"), "npu_only": ("npu", "npu")}
SUBSTITUTES = {"npu": ("dml", "cpu"), "dml": ("cpu",), "cpu": ()}


@dataclass(frozen=True)
class Override:
    """One difference between the configured and the effective policy (or session), and why."""

    field: str
    configured: Any
    effective: Any
    source: str      # device | device_error | memory_pressure | quality_guard | thread_policy | baseline | ...
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "configured": self.configured, "effective": self.effective,
                "source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class RunState:
    """What the controller measured before a run, the inputs to the overrides."""

    available_providers: frozenset[str]
    lost_devices: tuple[str, ...] = ()
    memory_pressure: bool = False
    pressure: float = 0.0
    guard_level: int = 0
    guard_action: str = "policy plan"
    guard_max_tier_name: str = "INT4"
    evictions_allowed: bool = True
    allow_spinning: bool = True
    other_cores: float | None = None
    baseline_reason: str | None = None


@dataclass(frozen=True)
class EffectivePolicy:
    policy: Policy
    prefill_device: str
    decode_device: str
    allow_spinning: bool
    state: RunState
    overrides: tuple[Override, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.model_dump(), "overrides": [o.to_dict() for o in self.overrides]}


def resolve(configured: Policy, state: RunState) -> EffectivePolicy:
    """The policy requests run with now."""
    overrides: list[Override] = []
    prefill, decode = _devices(configured, state, overrides)
    kv = configured.kv.model_dump()
    if state.lost_devices:
        _conservative(kv, overrides, f"device error on {', '.join(state.lost_devices)}: CPU with conservative KV "
                                     "thresholds until it recovers (fallback table: DML not detected)")
    if state.memory_pressure:
        _compress(kv, overrides, f"memory pressure {state.pressure:.0%} (> 80%): compress harder until < 80%")
    if state.guard_level > 0:
        overrides.append(Override("kv.max_tier", "INT4", state.guard_max_tier_name, "quality_guard",
                                  f"quality guard level {state.guard_level} ({state.guard_action}): the online "
                                  "ΔPPL estimate exceeded quality.max_delta_ppl"))
        if configured.kv.segment_reuse:
            kv["segment_reuse"] = False
            overrides.append(Override("kv.segment_reuse", True, False, "quality_guard",
                                      f"quality guard level {state.guard_level}: shifted segments are prefilled"))
        if configured.kv.live_format == "int8" and state.guard_max_tier_name == "FP16":
            kv["live_format"] = "model"
            overrides.append(Override("kv.live_format", "int8", "model", "quality_guard",
                                      f"quality guard level {state.guard_level}: KV stays in the model's dtype"))
    if not state.evictions_allowed:
        overrides.append(Override("kv.level_thresholds.L3_evict", configured.kv.level_thresholds.L3_evict, "never",
                                  "quality_guard", f"quality guard level {state.guard_level}: no eviction"))
    spinning = _spinning(configured, state, overrides)
    if state.baseline_reason is not None:
        overrides.append(Override("engine", "inferos", "og.Generator (baseline)", "baseline", state.baseline_reason))
    scheduler = {**configured.scheduler.model_dump(), "prefill_device": prefill, "decode_device": decode}
    policy = configured.merged({"kv": kv, "scheduler": scheduler}) if overrides else configured
    return EffectivePolicy(policy, prefill, decode, spinning, state, tuple(overrides))


def _devices(configured: Policy, state: RunState, overrides: list[Override]) -> tuple[str, str]:
    scheduler = configured.scheduler
    wanted = SCHEDULER_DEVICES.get(scheduler.mode, (scheduler.prefill_device, scheduler.decode_device))
    chosen = []
    for phase, device in zip(("prefill", "decode"), wanted):
        actual = _present(device, state)
        if actual != device:
            lost = device in state.lost_devices
            why = (f"{DEVICE_TO_PROVIDER[device]} failed while serving" if lost else
                   f"{DEVICE_TO_PROVIDER[device]} is not in this onnxruntime build (available: "
                   f"{', '.join(sorted(state.available_providers))})")
            overrides.append(Override(f"scheduler.{phase}_device", device, actual,
                                      "device_error" if lost else "device", f"{why}: {phase} runs on {actual}"))
        chosen.append(actual)
    return chosen[0], chosen[1]


def _present(device: str, state: RunState) -> str:
    for candidate in (device, *SUBSTITUTES[device]):
        if candidate == "cpu" or (DEVICE_TO_PROVIDER[candidate] in state.available_providers
                                  and candidate not in state.lost_devices):
            return candidate
    return "cpu"


def _conservative(kv: dict[str, Any], overrides: list[Override], reason: str) -> None:
    t = kv["level_thresholds"]
    for name in ("L1_int8", "L2_int4", "L3_evict"):
        _set(overrides, t, name, round(min(1.0, t[name] + 0.1), 4), f"kv.level_thresholds.{name}", "device_error",
             reason)
    _set(overrides, kv, "recent_window", max(kv["recent_window"], 128), "kv.recent_window", "device_error", reason)


def _compress(kv: dict[str, Any], overrides: list[Override], reason: str) -> None:
    t = kv["level_thresholds"]
    for name in ("L1_int8", "L2_int4", "L3_evict"):
        _set(overrides, t, name, round(max(0.0, t[name] - 0.1), 4), f"kv.level_thresholds.{name}",
             "memory_pressure", reason)
    _set(overrides, kv, "recent_window", max(16, kv["recent_window"] // 2), "kv.recent_window", "memory_pressure",
         reason)


def _set(overrides: list[Override], section: dict[str, Any], key: str, value: Any, name: str, source: str,
         reason: str) -> None:
    if section[key] != value:
        overrides.append(Override(name, section[key], value, source, reason))
        section[key] = value


def _spinning(configured: Policy, state: RunState, overrides: list[Override]) -> bool:
    if state.allow_spinning:
        return True
    explicit = [p for p in ("prefill", "decode") if getattr(configured.scheduler, p).allow_spinning is True]
    cores = f"{state.other_cores:.2f}" if state.other_cores is not None else "?"
    overrides.append(Override("threads.allow_spinning", True, False, "thread_policy",
                              f"other processes use {cores} cores: ONNX Runtime's threads do not spin"
                              + (f" (except {', '.join(explicit)}: set in scheduler)" if explicit else "")))
    return False
