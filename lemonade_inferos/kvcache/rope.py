"""Re-rotating cached keys when RoPE positions must be re-indexed.

Keys are cached after RoPE. Up to the model's RoPE table length every token
keeps its true position. Past it (generation beyond the context window), the
cache re-indexes the tokens it still holds to 0..n-1 (StreamingLLM assigns
positions within the cache the same way) by rotating each cached key by its
position change, using the model's own cos/sin tables. Rotation uses the
half-split (non-interleaved) layout that GroupQueryAttention uses with
``rotary_interleaved=0``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lemonade_inferos.engine.model_folder import initializer_array


@dataclass(frozen=True)
class RopeTables:
    cos: np.ndarray   # [max_positions, head_size / 2]
    sin: np.ndarray

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    @classmethod
    def from_onnx(cls, onnx_path: Path) -> "RopeTables | None":
        """Read ``cos_cache``/``sin_cache`` initializers; None when the graph has none."""
        model = onnx.load(str(onnx_path), load_external_data=False)
        found = {i.name: i for i in model.graph.initializer if i.name in ("cos_cache", "sin_cache")}
        if len(found) != 2:
            return None
        return cls(initializer_array(found["cos_cache"], onnx_path.parent).astype(np.float32),
                   initializer_array(found["sin_cache"], onnx_path.parent).astype(np.float32))

    def rotate(self, keys: np.ndarray, delta: np.ndarray) -> None:
        """Rotate ``keys`` ``[H, T, D]`` in place by ``delta`` ``[T]`` positions (may be negative)."""
        magnitude = np.abs(delta)
        assert magnitude.max(initial=0) < self.max_positions, "rotation beyond the RoPE table: a bug in the cache"
        cos = self.cos[magnitude][None]                          # [1, T, D/2]
        sin = (self.sin[magnitude] * np.sign(delta)[:, None])[None]
        half = keys.shape[-1] // 2
        x1, x2 = keys[..., :half].copy(), keys[..., half:].copy()
        keys[..., :half] = x1 * cos - x2 * sin
        keys[..., half:] = x2 * cos + x1 * sin


def rope_tables(engine: Any) -> RopeTables | None:
    """The RoPE tables of ``engine``'s model, read once per model; None where the graph takes no true positions
    (a cache without them refuses tokens past the table instead of re-indexing)."""
    return _tables_of(str(engine.folder.onnx_path)) if engine.has_position_ids else None


@functools.lru_cache(maxsize=8)
def _tables_of(onnx_path: str) -> RopeTables | None:
    return RopeTables.from_onnx(Path(onnx_path))
