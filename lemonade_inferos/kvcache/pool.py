"""The block pool: owns every block, the free queue and the quantized bytes.

Like vLLM's BlockPool, blocks are recycled through a free queue instead of
being created per sequence; sequences hold lists of blocks. The quantized K/V
of block ``b``, layer ``l`` is ``storage[b][l] = (keys, values)``.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.codecs import QuantizedTensor

LayerKV = tuple[QuantizedTensor, QuantizedTensor]


class BlockPool:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._blocks: list[KVBlock] = []
        self._free: deque[int] = deque()
        self._storage: dict[int, dict[int, LayerKV]] = {}

    def allocate(self, num_tokens: int) -> KVBlock:
        """A block with ``ref_cnt == 1``, recycled from the free queue when one is there."""
        if self._free:
            block = self._blocks[self._free.popleft()]
        else:
            block = KVBlock(block_id=len(self._blocks))
            self._blocks.append(block)
        block.ref_cnt = 1
        block.block_hash = None
        block.num_tokens = num_tokens
        block.tiers = np.zeros(self.num_layers, dtype=np.int8)
        block.scores = np.zeros(self.num_layers, dtype=np.float32)
        block.importance = np.zeros(self.num_layers, dtype=np.float32)
        return block

    def free(self, block: KVBlock) -> None:
        """Drop one reference; at zero the block's bytes are released and its id reused."""
        assert block.ref_cnt > 0, f"double free of block {block.block_id}: this indicates a bug in the cache"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self._storage.pop(block.block_id, None)
            self._free.append(block.block_id)

    def store(self, block: KVBlock, layer: int, keys: QuantizedTensor, values: QuantizedTensor) -> None:
        self._storage.setdefault(block.block_id, {})[layer] = (keys, values)

    def store_half(self, block: KVBlock, layer: int, slot: int, tensor: QuantizedTensor) -> None:
        """Store the keys (``slot`` 0) or values (1) of one layer; the other half is kept or filled later."""
        layers = self._storage.setdefault(block.block_id, {})
        pair = list(layers.get(layer, (tensor, tensor)))
        pair[slot] = tensor
        layers[layer] = (pair[0], pair[1])

    def load(self, block: KVBlock, layer: int) -> LayerKV | None:
        return self._storage.get(block.block_id, {}).get(layer)

    def nbytes_by_bits(self) -> dict[int, int]:
        """Bytes held for quantized K/V, by bit width (codes + scales + minimums)."""
        totals: dict[int, int] = {8: 0, 4: 0}
        for layers in self._storage.values():
            for keys, values in layers.values():
                totals[keys.bits] += keys.nbytes + values.nbytes
        return totals

    @property
    def num_blocks_in_use(self) -> int:
        return len(self._blocks) - len(self._free)
