"""The block pool: owns every block of a cache or a store, its bytes, and (for a store) the hash index.

Like vLLM's BlockPool: blocks are recycled through a free queue instead of being created per sequence, and
blocks whose contents are worth finding again stay *cached* after their last reference is dropped, in a hash
index (chained prefix hash -> block), and are evicted lazily, least recently used first, only when their bytes
exceed the pool's budget. Evicted cached blocks go to the ``lower`` tier when there is one (the prefix store's
disk spill, ``disk_tier.py``), which brings them back on a miss.

Bytes per block: ``storage[block_id][layer] = (keys, values)``. A live cache's block is quantized layer by layer
as layers are demoted; a cached block holds all layers at once, stacked along heads, under ``ALL_LAYERS``
(quantized, or raw arrays for an exact block).

A block is pinned while someone reads it (``ref_cnt > 0``): eviction never takes a pinned block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Protocol

import numpy as np

from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.codecs import QuantizedTensor

ALL_LAYERS = -1
Tensor = QuantizedTensor | np.ndarray
LayerKV = tuple[Tensor, Tensor]


class LowerTier(Protocol):
    """Where evicted cached blocks go, and come back from (the disk spill)."""

    def write(self, block: KVBlock, keys: Tensor, values: Tensor) -> bool: ...

    def read(self, block_hash: bytes) -> tuple[tuple[int, ...], int, Tensor, Tensor] | None: ...

    def discard(self, block_hash: bytes) -> None: ...


class BlockPool:
    def __init__(self, num_layers: int, budget_bytes: int | None = None, lower: LowerTier | None = None) -> None:
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self.lower = lower
        self._blocks: list[KVBlock] = []
        self._free: deque[int] = deque()
        self._storage: dict[int, dict[int, LayerKV]] = {}
        self._index: OrderedDict[bytes, int] = OrderedDict()  # cached blocks, least recently used first
        self.nbytes = 0
        self.evicted_blocks = 0

    # -- blocks --------------------------------------------------------------------------------------
    def allocate(self, num_tokens: int) -> KVBlock:
        """A block with ``ref_cnt == 1``, recycled from the free queue when one is there."""
        if self._free:
            block = self._blocks[self._free.popleft()]
        else:
            block = KVBlock(block_id=len(self._blocks))
            self._blocks.append(block)
        block.ref_cnt = 1
        block.block_hash = None
        block.token_ids = ()
        block.start = 0
        block.num_tokens = num_tokens
        block.tiers = np.zeros(self.num_layers, dtype=np.int8)
        block.scores = np.zeros(self.num_layers, dtype=np.float32)
        block.importance = np.zeros(self.num_layers, dtype=np.float32)
        return block

    def block(self, block_id: int) -> KVBlock:
        return self._blocks[block_id]

    def free(self, block: KVBlock) -> None:
        """Drop one reference. At zero a cached block stays (evictable); any other is released, its id reused."""
        assert block.ref_cnt > 0, f"double free of block {block.block_id}: this indicates a bug in the cache"
        block.ref_cnt -= 1
        if block.ref_cnt == 0 and block.block_hash is None:
            self._release(block)

    def _release(self, block: KVBlock) -> None:
        self.nbytes -= self._nbytes_of(block.block_id)
        self._storage.pop(block.block_id, None)
        self._free.append(block.block_id)

    # -- bytes ---------------------------------------------------------------------------------------
    def store(self, block: KVBlock, layer: int, keys: Tensor, values: Tensor) -> None:
        layers = self._storage.setdefault(block.block_id, {})
        self.nbytes -= _pair_nbytes(layers.get(layer))
        layers[layer] = (keys, values)
        self.nbytes += _pair_nbytes(layers[layer])

    def store_half(self, block: KVBlock, layer: int, slot: int, tensor: QuantizedTensor) -> None:
        """Store the keys (``slot`` 0) or values (1) of one layer; the other half is kept or filled later."""
        pair = list(self._storage.get(block.block_id, {}).get(layer, (tensor, tensor)))
        pair[slot] = tensor
        self.store(block, layer, pair[0], pair[1])

    def load(self, block: KVBlock, layer: int = ALL_LAYERS) -> LayerKV | None:
        return self._storage.get(block.block_id, {}).get(layer)

    def nbytes_by_bits(self) -> dict[int, int]:
        """Bytes held for quantized K/V, by bit width (codes + scales + minimums)."""
        totals: dict[int, int] = {8: 0, 4: 0}
        for layers in self._storage.values():
            for keys, values in layers.values():
                if isinstance(keys, QuantizedTensor):
                    totals[keys.bits] += keys.nbytes + values.nbytes
        return totals

    def _nbytes_of(self, block_id: int) -> int:
        return sum(_pair_nbytes(pair) for pair in self._storage.get(block_id, {}).values())

    @property
    def num_blocks_in_use(self) -> int:
        return len(self._blocks) - len(self._free)

    # -- the hash index of cached blocks ---------------------------------------------------------------
    def cache(self, block_hash: bytes, token_ids: tuple[int, ...], tier: int, keys: Tensor,
              values: Tensor) -> KVBlock:
        """Keep a block at rest under ``block_hash`` (replacing what was cached there), all layers stacked."""
        self.uncache(block_hash)
        block = self.allocate(len(token_ids))
        block.ref_cnt = 0
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        block.tiers[:] = tier
        self.store(block, ALL_LAYERS, keys, values)
        self._index[block_hash] = block.block_id
        return block

    def cached(self, block_hash: bytes, reach_lower: bool = True) -> KVBlock | None:
        """The block cached under ``block_hash`` in memory, else (``reach_lower``) brought back from the lower
        tier, else None."""
        block_id = self._index.get(block_hash)
        if block_id is not None:
            return self._blocks[block_id]
        found = self.lower.read(block_hash) if self.lower is not None and reach_lower else None
        if found is None:
            return None
        token_ids, tier, keys, values = found
        return self.cache(block_hash, token_ids, tier, keys, values)  # back in memory: it is hot again

    def touch(self, block: KVBlock | None) -> None:
        """Mark a cached block most recently used."""
        if block is not None and block.block_hash in self._index:
            self._index.move_to_end(block.block_hash)

    def pin(self, blocks: list[KVBlock]) -> None:
        for block in blocks:
            block.ref_cnt += 1

    def unpin(self, blocks: list[KVBlock]) -> None:
        for block in blocks:
            self.free(block)

    def uncache(self, block_hash: bytes, lower_too: bool = False) -> bool:
        """Forget the block cached under ``block_hash`` (and its lower-tier copy); False when there was none."""
        if lower_too and self.lower is not None:
            self.lower.discard(block_hash)
        block_id = self._index.pop(block_hash, None)
        if block_id is None:
            return False
        block = self._blocks[block_id]
        block.block_hash = None
        if block.ref_cnt == 0:
            self._release(block)
        return True

    def cached_blocks(self) -> list[KVBlock]:
        """Every cached block in memory, least recently used first."""
        return [self._blocks[block_id] for block_id in self._index.values()]

    def evict_to_budget(self) -> None:
        """Evict unpinned cached blocks, least recently used first, until the bytes fit the budget."""
        if self.budget_bytes is None:
            return
        for block_hash, block_id in list(self._index.items()):
            if self.nbytes <= self.budget_bytes:
                break
            block = self._blocks[block_id]
            if block.ref_cnt:
                continue
            if self.lower is not None:
                keys, values = self.load(block)
                self.lower.write(block, keys, values)
            self.uncache(block_hash)
            self.evicted_blocks += 1

    def spill_all(self) -> int:
        """Write every cached block to the lower tier (shutdown); returns how many were written."""
        if self.lower is None:
            return 0
        return sum(self.lower.write(block, *self.load(block)) for block in self.cached_blocks())


def _pair_nbytes(pair: Any) -> int:
    return 0 if pair is None else pair[0].nbytes + pair[1].nbytes
