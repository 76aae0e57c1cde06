"""What the tiered cache reports: bytes and tokens by tier, work done, compression."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class KVStats:
    tokens_seen: int = 0                 # every token committed (evicted ones included)
    tokens_held: int = 0                 # tokens in the working buffer
    tokens_by_tier: dict[str, float] = field(default_factory=dict)   # averaged over layers
    bytes_by_tier: dict[str, int] = field(default_factory=dict)      # at rest: L0 at model dtype, L1/L2 packed
    kv_bytes: int = 0
    live_form: str = "float32"           # what the working buffer holds: the model's dtype, or "int8" codes
    working_buffer_bytes: int = 0        # the dense compute view ONNX Runtime reads (allocated capacity)
    working_buffer_used_bytes: int = 0   # ... the part holding tokens
    live_bytes: int = 0                  # what the running request holds: working buffer + the pool's codes
    blocks_sealed: int = 0
    block_layers_quantized: dict[str, int] = field(default_factory=lambda: {"int8": 0, "int4": 0})
    blocks_evicted: int = 0
    rebases: int = 0
    segment_tokens: int = 0              # prompt tokens whose KV came from a shifted segment (segments.py)
    segment_recomputed_tokens: int = 0   # ... and tokens prefilled again at such a segment's seam
    quantize_seconds: float = 0.0
    fp16_bytes: int = 0                  # what the tokens seen would take at FP16
    model_dtype_bytes: int = 0           # ... and at the model's KV dtype

    @property
    def compression_vs_fp16(self) -> float | None:
        return self.kv_bytes / self.fp16_bytes if self.fp16_bytes else None

    @property
    def compression_vs_model_dtype(self) -> float | None:
        return self.kv_bytes / self.model_dtype_bytes if self.model_dtype_bytes else None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["compression_vs_fp16"] = self.compression_vs_fp16
        data["compression_vs_model_dtype"] = self.compression_vs_model_dtype
        return data
