"""The working buffer the model reads, seen in float whatever its live form.

It is the dense cache (``engine/kv.py``) ONNX Runtime binds as past and present; in the INT8 live form it holds
codes with the model's static per-channel scales (``layout.scales``). The tiered cache quantizes, rotates, parks and
restores blocks through this float view: reading dequantizes a copy, writing quantizes (values beyond the
calibrated range saturate, as the kernel's own writes do); in the model's dtype both are plain views.
"""

from __future__ import annotations

import numpy as np

from lemonade_inferos.engine.kv import DenseKVCache

KEYS, VALUES = 0, 1


class WorkingBuffer(DenseKVCache):
    def _half(self, layer: int, slot: int) -> np.ndarray:
        return (self.keys if slot == KEYS else self.values)[layer]

    def read(self, layer: int, slot: int, start: int, end: int) -> np.ndarray:
        """Float values of tokens ``[start, end)`` of one layer's keys (``slot`` 0) or values (1), ``[H, T, D]``:
        a view in the model's dtype, a dequantized copy in the INT8 live form."""
        view = self._half(layer, slot)[0, :, start:end]
        scales = self.layout.scales
        return scales.dequantize(view, layer, slot) if scales is not None else view

    def write(self, layer: int, slot: int, start: int, values: np.ndarray) -> None:
        """Write float ``values`` ``[H, T, D]`` from token ``start``."""
        view = self._half(layer, slot)[0, :, start:start + values.shape[1]]
        self.edited(start)
        if self.layout.scales is not None:
            self.layout.scales.quantize(values, layer, slot, out=view)
        else:
            view[...] = values

    def put_codes(self, layer: int, slot: int, start: int, codes: np.ndarray) -> None:
        """Copy stored INT8 live codes ``[H, T, D]`` in as they are."""
        self.edited(start)
        self._half(layer, slot)[0, :, start:start + codes.shape[1]] = codes

    def stacked(self, start: int, end: int, codes: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of tokens ``[start, end)`` for all layers stacked along heads, ``[layers * H, T, D]``:
        float values, or (``codes``, INT8 live form only) the codes themselves. Copies."""
        assert not codes or self.layout.live_int8, "codes of a float buffer: this indicates a bug in the caller"
        layers = range(self.layout.num_layers)
        if codes:
            return tuple(np.concatenate([self._half(layer, slot)[0, :, start:end] for layer in layers], axis=0)
                         for slot in (KEYS, VALUES))
        return tuple(np.concatenate([self.read(layer, slot, start, end) for layer in layers], axis=0)
                     for slot in (KEYS, VALUES))

    def edge_share(self) -> float | None:
        """Share of held INT8 codes at the range's edge (-128 or 127): an upper bound of the values the static
        scales clipped. None for a float buffer. A scan of the buffer: for evaluation, not the request path."""
        if not self.layout.live_int8 or not self.num_tokens:
            return None
        n = self.num_tokens
        edge = sum(int(((b[0, :, :n] == 127) | (b[0, :, :n] == -128)).sum()) for b in (*self.keys, *self.values))
        return edge / (2 * self.layout.num_layers * self.layout.num_kv_heads * n * self.layout.head_size)
