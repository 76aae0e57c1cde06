"""A KV block: metadata only. Its quantized bytes live in the pool's storage, indexed by ``block_id``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class KVBlock:
    """``block_size`` consecutive tokens of one sequence, across all layers.

    ``tiers`` and ``scores`` are per layer: a block can be INT4 in one layer and
    INT8 in another. Eviction is per block (all layers), because every layer must
    hold the same number of tokens (one attention mask feeds them all).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    start: int = 0                    # index of its first token in the owning sequence's working buffer
    num_tokens: int = 0
    tiers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    importance: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def end(self) -> int:
        return self.start + self.num_tokens
