"""INT8 and INT4 codecs for KV blocks (KIVI layout).

Keys are quantized per channel with groups along tokens (outlier channels in K
are persistent across tokens), values per token with groups along channels.
Both are asymmetric (min/max) with fp16 scale and minimum stored beside the
codes and counted in the block's bytes. INT4 codes are really packed, two per
byte. A codec is chosen by name from :data:`CODECS`.

Shapes: a block's keys or values for one layer are ``[kv_heads, tokens, head_size]``.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np

from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8

ALLOWED_BITS = (4, 8)
ALLOWED_GROUP_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes plus the per-group scale and minimum needed to restore them."""

    codes: np.ndarray      # uint8; for 4 bits the last axis holds two codes per byte
    scale: np.ndarray      # float16, broadcastable over the groups
    minimum: np.ndarray    # float16
    shape: tuple[int, ...]
    bits: int
    axis: str              # "token" (keys: groups along tokens) or "channel" (values: groups along channels)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes

    def slice_heads(self, start: int, count: int) -> "QuantizedTensor":
        """The part of a tensor quantized with layers stacked along heads that belongs to ``count`` heads.

        Copies, so the slice owns its bytes (a view would keep the whole stacked array alive).
        """
        part = slice(start, start + count)
        return QuantizedTensor(self.codes[part].copy(), self.scale[part].copy(), self.minimum[part].copy(),
                               (count,) + self.shape[1:], self.bits, self.axis)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack pairs of 4-bit codes along the last axis into bytes (low nibble first)."""
    assert codes.shape[-1] % 2 == 0, "INT4 packing needs an even last dimension: this indicates a bug in the caller"
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


class AsymmetricCodec:
    """Min/max quantization to ``bits`` with groups of ``group_size`` along one axis."""

    def __init__(self, bits: int, group_size: int = 32) -> None:
        if bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits}")
        if group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {ALLOWED_GROUP_SIZES}, got {group_size}")
        self.bits = bits
        self.group_size = group_size
        self.levels = (1 << bits) - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def _grouped(self, x: np.ndarray, axis: str) -> np.ndarray:
        """View ``[H, T, D]`` as groups: keys ``[H, T/g, g, D]`` (reduce axis 2), values ``[H, T, D/g, g]`` (axis 3)."""
        heads, tokens, dim = x.shape
        if axis == "token":
            g = min(self.group_size, tokens)
            if tokens % g:
                raise ValueError(f"{tokens} tokens do not split into key groups of {g}; use a power-of-two block size")
            return x.reshape(heads, tokens // g, g, dim)
        g = min(self.group_size, dim)
        if dim % g:
            raise ValueError(f"head size {dim} does not split into value groups of {g}")
        return x.reshape(heads, tokens, dim // g, g)

    def quantize(self, x: np.ndarray, axis: str) -> QuantizedTensor:
        """Quantize ``x`` ``[H, T, D]``; ``axis`` is "token" for keys, "channel" for values."""
        grouped = self._grouped(np.asarray(x, dtype=np.float32), axis)
        reduce_axis = 2 if axis == "token" else 3
        lo = grouped.min(axis=reduce_axis, keepdims=True)
        hi = grouped.max(axis=reduce_axis, keepdims=True)
        # quantize with the fp16-rounded scale/minimum so dequantize reproduces exactly what was stored
        minimum = lo.astype(np.float16)
        scale = ((hi - minimum.astype(np.float32)) / self.levels).astype(np.float16)
        scale32 = np.where(scale.astype(np.float32) > 0, scale.astype(np.float32), 1.0)
        codes = np.clip(np.rint((grouped - minimum.astype(np.float32)) / scale32), 0, self.levels).astype(np.uint8)
        codes = codes.reshape(x.shape)
        if self.bits == 4:
            codes = pack_int4(codes)
        return QuantizedTensor(codes, scale, minimum, tuple(x.shape), self.bits, axis)

    def dequantize(self, q: QuantizedTensor, out: np.ndarray | None = None) -> np.ndarray:
        """Restore ``[H, T, D]`` float32 values (into ``out`` when given)."""
        codes = unpack_int4(q.codes) if q.bits == 4 else q.codes
        restored = self._grouped(codes.astype(np.float32), q.axis)
        restored = restored * q.scale.astype(np.float32) + q.minimum.astype(np.float32)
        restored = restored.reshape(q.shape)
        if out is None:
            return restored
        out[...] = restored
        return out

    def nbytes(self, heads: int, tokens: int, dim: int, axis: str) -> int:
        """Exact bytes of a quantized ``[heads, tokens, dim]`` tensor (codes + fp16 scale + fp16 minimum)."""
        codes = heads * tokens * dim * self.bits // 8
        if axis == "token":
            groups = heads * (tokens // min(self.group_size, tokens)) * dim
        else:
            groups = heads * tokens * (dim // min(self.group_size, dim))
        return codes + 2 * 2 * groups


CODECS = {
    "int8": lambda group_size=32: AsymmetricCodec(8, group_size),
    "int4": lambda group_size=32: AsymmetricCodec(4, group_size),
}
TIER_BITS = {TIER_INT8: 8, TIER_INT4: 4}  # the one tier -> codec registry: L1 is INT8, L2 is INT4


def get_codec(name: str, group_size: int = 32) -> AsymmetricCodec:
    if name not in CODECS:
        raise ValueError(f"unknown KV codec '{name}'; choose one of {sorted(CODECS)}")
    return CODECS[name](group_size)


@functools.lru_cache(maxsize=None)
def codec_for_tier(tier: int, group_size: int = 32) -> AsymmetricCodec:
    """The codec of a quantized tier (codecs hold no state, so one instance serves every cache and store)."""
    if tier not in TIER_BITS:
        raise ValueError(f"tier {tier} is not a quantized tier ({sorted(TIER_BITS)})")
    return AsymmetricCodec(TIER_BITS[tier], group_size)
