"""What the tiered cache reports: bytes and tokens by tier, work done, compression."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from lemonade_inferos.kvcache.plan import TIER_EVICTED, TIER_INT4, TIER_INT8, TIER_L0, TIER_NAMES

if TYPE_CHECKING:
    from lemonade_inferos.kvcache.manager import TieredKVCache


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


def measure(cache: TieredKVCache) -> KVStats:
    """Bytes and tokens by tier, measured from the working buffer, the pool's arrays and the block table.

    At rest: every held token at its tier (the floor tier's bytes are the working buffer's own, INT8 codes in
    the INT8 live form; demoted layers at their KIVI bytes). Live: the working buffer as allocated and as used,
    plus the pool's bytes.
    """
    layout, stats = cache.layout, cache.stats
    per_token_layer = 2 * layout.num_kv_heads * layout.head_size
    tier_tokens = {tier: 0 for tier in cache.tiers_above_floor()}
    for block in cache.blocks:
        for tier in tier_tokens:
            tier_tokens[tier] += int((block.tiers == tier).sum()) * block.num_tokens
    floor_token_layers = cache.num_tokens * layout.num_layers - sum(tier_tokens.values())
    by_bits = cache.pool.nbytes_by_bits()
    stats.tokens_seen = len(cache.token_ids)
    stats.tokens_held = cache.num_tokens
    tokens = {TIER_L0: 0.0, TIER_INT8: 0.0, TIER_INT4: 0.0}
    tokens[cache.floor_tier] = floor_token_layers / layout.num_layers
    for tier, count in tier_tokens.items():
        tokens[tier] += count / layout.num_layers
    stats.tokens_by_tier = {TIER_NAMES[t]: v for t, v in tokens.items()}
    stats.tokens_by_tier[TIER_NAMES[TIER_EVICTED]] = float(stats.tokens_seen - cache.num_tokens)
    floor_bytes = floor_token_layers * per_token_layer * layout.dtype.itemsize
    stats.bytes_by_tier = {TIER_NAMES[TIER_L0]: 0, TIER_NAMES[TIER_INT8]: by_bits[8], TIER_NAMES[TIER_INT4]: by_bits[4]}
    stats.bytes_by_tier[TIER_NAMES[cache.floor_tier]] += floor_bytes
    stats.kv_bytes = sum(stats.bytes_by_tier.values())
    stats.live_form = "int8" if layout.live_int8 else str(layout.dtype)
    stats.working_buffer_bytes = cache.buffer.nbytes
    stats.working_buffer_used_bytes = cache.num_tokens * layout.bytes_per_token
    stats.live_bytes = cache.nbytes
    stats.fp16_bytes = stats.tokens_seen * layout.num_layers * per_token_layer * 2
    stats.model_dtype_bytes = stats.tokens_seen * layout.num_layers * per_token_layer * layout.dtype.itemsize
    return replace(stats)
