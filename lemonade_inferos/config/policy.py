"""The policy schema of the design document, as pydantic models.

``POST /v1/policy`` merges a partial document into the current policy; an
invalid one raises and changes nothing. Ranges come from the design document:
recent_window 16..512, thresholds 0..1, pool sizes >= 1 GiB, max_delta_ppl 0..2.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lemonade_inferos.config.sizes import parse_size

GIB = 1024**3

SpeculativeMode = Literal["off", "ngram", "draft", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LevelThresholds(_Strict):
    L1_int8: float = Field(0.7, ge=0.0, le=1.0)
    L2_int4: float = Field(0.5, ge=0.0, le=1.0)
    L3_evict: float = Field(0.3, ge=0.0, le=1.0)


class KVPolicy(_Strict):
    mode: Literal["dynamic", "latency_optimized", "throughput_optimized", "quality_optimized", "disabled"] = "dynamic"
    recent_window: int = Field(64, ge=16, le=512)
    level_thresholds: LevelThresholds = Field(default_factory=LevelThresholds)
    # this project's extension: the working buffer's form while a request runs (docs/kv-cache.md)
    live_format: Literal["int8", "model"] = "int8"
    # this project's extension: reuse KV of a prompt run an earlier sequence holds shifted (kvcache/segments.py)
    segment_reuse: bool = True
    segment_recompute: float = Field(0.05, ge=0.0, le=1.0, description="share of a shifted segment prefilled "
                                     "again at its seam (at least 16 tokens)")


class IOPolicy(_Strict):
    enable_iobinding: bool = True
    dml_pool_bytes: int = Field(2 * GIB, ge=GIB)
    host_pool_bytes: int = Field(4 * GIB, ge=GIB)
    # this project's extensions: ONNX Runtime run options of every step
    arena_shrinkage: bool = Field(False, description="give the CPU arena's unused memory back after each run "
                                  "(run config memory.enable_memory_arena_shrinkage)")
    run_config: dict[str, str] = Field(default_factory=dict, description="further ONNX Runtime run config "
                                       "entries, passed as given")

    @field_validator("dml_pool_bytes", "host_pool_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> int:
        return parse_size(value)


class PhaseSettings(_Strict):
    """One phase's session options (this project's extension): threads and spinning, ``None`` = the default
    (ONNX Runtime's thread count; spinning as the thread policy decides, ``controller/threads.py``)."""

    intra_op_num_threads: int = Field(0, ge=0, le=256)
    allow_spinning: bool | None = None


class SchedulerPolicy(_Strict):
    """Where prefill and decode run. When the two phases' devices or options differ, the engine keeps a session
    per phase over the same KV buffers (the hybrid scheduler, ``engine/binding.py``)."""

    mode: Literal["hybrid", "gpu_only", "npu_only"] = "hybrid"
    prefill_device: Literal["dml", "npu", "cpu"] = "dml"
    decode_device: Literal["npu", "dml", "cpu"] = "npu"
    prefill: PhaseSettings = Field(default_factory=PhaseSettings)
    decode: PhaseSettings = Field(default_factory=PhaseSettings)


class QualityPolicy(_Strict):
    max_delta_ppl: float = Field(0.5, ge=0.0, le=2.0)
    min_accept_rate: float = Field(0.5, ge=0.0, le=1.0)


class SpeculativeSettings(BaseModel):
    """What drafts and how much (``engine/speculative.py``): the policy's ``speculative`` section is this."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: SpeculativeMode = "auto"
    num_draft_tokens: int = Field(6, ge=1, le=16)
    ngram_min: int = Field(2, ge=1, le=8)
    ngram_max: int = Field(4, ge=1, le=8)
    draft_model: str | None = Field(None, description="mode draft: a model folder or name with the same tokenizer")

    @model_validator(mode="after")
    def _consistent(self) -> "SpeculativeSettings":
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if self.mode == "draft" and not self.draft_model:
            raise ValueError("speculative mode 'draft' needs draft_model (a smaller model with the same tokenizer)")
        return self


class SpeculativePolicy(SpeculativeSettings):
    """Speculative decoding: this project's extension of the design document's schema (docs/benchmarks.md, "Decode").

    ``auto`` drafts by prompt lookup and stops drafting in a request whose acceptance falls below
    ``quality.min_accept_rate`` (and starts that chat's next turn with fewer draft tokens); ``ngram`` drafts the
    same way; ``off`` decodes plainly.
    """

    # that ``draft_model`` names a model that exists is checked where models are known (controller/policy_store.py)


class Policy(_Strict):
    kv: KVPolicy = Field(default_factory=KVPolicy)
    io: IOPolicy = Field(default_factory=IOPolicy)
    scheduler: SchedulerPolicy = Field(default_factory=SchedulerPolicy)
    quality: QualityPolicy = Field(default_factory=QualityPolicy)
    speculative: SpeculativePolicy = Field(default_factory=SpeculativePolicy)

    def merged(self, update: dict[str, Any]) -> "Policy":
        """A new policy with ``update`` (a partial policy document) merged in; validated as a whole.

        Raises:
            pydantic.ValidationError: the merged document is invalid (nothing changes).
        """
        return Policy.model_validate(deep_merge(self.model_dump(), update))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
