"""A KV block: metadata only. Its bytes live in the pool that owns it, indexed by ``block_id``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class KVBlock:
    """``block_size`` consecutive tokens of one sequence, across all layers.

    The same block model serves a live cache (``start`` is where the block sits in the cache's working buffer)
    and a prefix store (the block is cached at rest: ``block_hash`` is its chained prefix hash, ``token_ids`` the
    tokens it holds, found through the pool's hash index).

    ``tiers`` and ``scores`` are per layer: a live block can be INT4 in one layer and INT8 in another. Eviction is
    per block (all layers), because every layer must hold the same number of tokens (one attention mask feeds
    them all).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    start: int = 0                    # index of its first token in the owning sequence's working buffer
    num_tokens: int = 0
    tiers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    importance: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def tier(self) -> int:
        """The block's lowest-precision layer tier (a cached block is at one tier in every layer)."""
        return int(self.tiers.max(initial=0))
