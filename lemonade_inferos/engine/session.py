"""ONNX Runtime session and run options from a policy, with provider fallback.

The target is Windows on Ryzen AI (DirectML iGPU, NPU); here the CPU provider
is the tested path. A requested provider that is not installed is logged and
reported in :class:`AppliedSessionOptions`, never a crash.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal

import onnxruntime as ort
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

DEVICE_TO_PROVIDER = {
    "dml": "DmlExecutionProvider",
    "npu": "VitisAIExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

# measured (tests/engine/test_session.py pins it): ONNX Runtime's shared CPU arena (create_and_register_allocator
# with OrtArenaCfg max_mem, and session.use_env_allocators) caps a plain graph's allocations but not this model's: a
# 1 MiB cap let a 100 MB logits output through. So the knob is reported, not claimed.
HOST_POOL_NOT_APPLIED = ("ONNX Runtime's CPU arena cap (a shared allocator with max_mem) does not bound this model's "
                         "allocations (measured); CPU memory is bounded by the KV plan and the prefix budgets")

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


PHASES = ("prefill", "decode")


class PhaseOverrides(BaseModel):
    """How decode's session differs from prefill's (the hybrid scheduler): another device list, thread count or
    spinning. Unset fields are prefill's."""

    model_config = {"frozen": True}
    devices: list[Literal["dml", "npu", "cuda", "cpu"]] | None = None
    intra_op_num_threads: int | None = Field(None, ge=0)
    allow_spinning: bool | None = None


class SessionPolicy(BaseModel):
    """The part of a policy that shapes an ONNX Runtime session.

    ``devices`` are tried in order; CPU is always appended as the last resort. With ``decode`` set to something
    that differs from prefill, the engine keeps two sessions: prompts run on this one, decode steps on the
    other, both reading and writing the same KV buffers (the hybrid scheduler).
    """

    devices: list[Literal["dml", "npu", "cuda", "cpu"]] = Field(default_factory=lambda: ["dml", "cpu"])
    intra_op_num_threads: int = Field(0, ge=0, description="0 lets ONNX Runtime use one thread per physical core")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    enable_iobinding: bool = True
    enable_cpu_mem_arena: bool = True
    allow_spinning: bool = True
    dml_pool_bytes: int | None = Field(None, ge=0)
    host_pool_bytes: int | None = Field(None, ge=0)
    attention_probe: bool = Field(False, description="load the graph variant that returns attention probabilities "
                                                     "of two layers, for caches that rank blocks by attention")
    kv_cache: Literal["model", "int8"] = Field("model", description="the live KV form caches get by default: the "
                                               "model's own dtype, or INT8 with per-channel scales (the graph is "
                                               "patched and calibrated at load; see engine/kv_scales.py)")
    decode: PhaseOverrides | None = Field(None, description="decode's session options where they differ")

    def for_phase(self, phase: str) -> "SessionPolicy":
        """This policy as one phase's session sees it (no ``decode`` field of its own)."""
        base = self.model_copy(update={"decode": None})
        if phase == "prefill" or self.decode is None:
            return base
        return base.model_copy(update={k: v for k, v in self.decode.model_dump().items() if v is not None})

    @property
    def hybrid(self) -> bool:
        """Whether decode runs on a session of its own: its options differ from prefill's once each phase's
        devices are resolved to the providers this build has (DirectML for prefill and the NPU for decode, both
        falling back to the CPU, is one session, not two copies of the weights)."""
        if self.decode is None:
            return False
        prefill, decode = self.for_phase("prefill"), self.for_phase("decode")
        return _resolved(decode) != _resolved(prefill)


@dataclass
class AppliedSessionOptions:
    """What was asked, what was applied and why the rest was not: reported by the API."""

    requested_providers: list[str]
    providers: list[str]
    missing_providers: list[str]
    applied: dict[str, object] = field(default_factory=dict)
    not_applied: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"requested_providers": self.requested_providers, "providers": self.providers,
                "missing_providers": self.missing_providers, "applied": self.applied,
                "not_applied": self.not_applied}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(devices: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Order providers by preference, dropping those this ONNX Runtime build lacks.

    Returns:
        (requested, chosen, missing) provider names.
    """
    available = set(available_providers())
    requested = [DEVICE_TO_PROVIDER[d] for d in devices]
    if "CPUExecutionProvider" not in requested:
        requested.append("CPUExecutionProvider")
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    for provider in missing:  # info, not a warning: CPU is a documented path, and the API reports the fallback
        _log_once("execution provider %s is not available in this onnxruntime build; using %s",
                  provider, chosen[0] if chosen else "CPUExecutionProvider")
    return requested, chosen or ["CPUExecutionProvider"], missing


def _resolved(policy: SessionPolicy) -> SessionPolicy:
    """``policy`` with its devices replaced by the providers it gets here."""
    return policy.model_copy(update={"devices": choose_providers(list(policy.devices))[1]})


@functools.lru_cache(maxsize=None)
def _log_once(message: str, *args: object) -> None:
    log.info(message, *args)


def build_session_options(policy: SessionPolicy) -> tuple[ort.SessionOptions, AppliedSessionOptions]:
    """Translate a :class:`SessionPolicy` into ``ort.SessionOptions`` and a report."""
    requested, providers, missing = choose_providers(list(policy.devices))
    options = ort.SessionOptions()
    report = AppliedSessionOptions(requested_providers=requested, providers=providers, missing_providers=missing)
    options.graph_optimization_level = _OPT_LEVELS[policy.graph_optimization_level]
    report.applied["graph_optimization_level"] = policy.graph_optimization_level
    if policy.intra_op_num_threads:
        options.intra_op_num_threads = policy.intra_op_num_threads
    report.applied["intra_op_num_threads"] = policy.intra_op_num_threads or "ort-default"
    options.enable_cpu_mem_arena = policy.enable_cpu_mem_arena
    report.applied["enable_cpu_mem_arena"] = policy.enable_cpu_mem_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if policy.allow_spinning else "0")
    report.applied["allow_spinning"] = policy.allow_spinning
    report.applied["enable_iobinding"] = policy.enable_iobinding  # the engine's step path (engine/binding.py)
    if "DmlExecutionProvider" in providers:
        # DirectML needs sequential execution and no memory pattern (Microsoft's DML EP docs).
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if policy.dml_pool_bytes is not None:
        report.not_applied["dml_pool_bytes"] = (
            "DmlExecutionProvider exposes no pool-size option" if "DmlExecutionProvider" in providers
            else "DmlExecutionProvider is not in use")
    if policy.host_pool_bytes is not None:
        report.not_applied["host_pool_bytes"] = HOST_POOL_NOT_APPLIED
    return options, report


def make_run_options(entries: "dict[str, str] | ort.RunOptions | None", always: bool = False
                     ) -> ort.RunOptions | None:
    """``ort.RunOptions`` carrying config entries (given ones are used as they are), or None when there are none
    and ``always`` is false."""
    if isinstance(entries, ort.RunOptions):
        return entries
    if not entries and not always:
        return None
    options = ort.RunOptions()
    for key, value in (entries or {}).items():
        options.add_run_config_entry(key, str(value))
    return options
