"""The tiered KV cache the engine reads and writes every step.

Token layout of one sequence, per layer, in the working buffer ONNX Runtime reads::

    | sinks... | sealed blocks: L0 / L1 INT8 / L2 INT4 (evicted ones removed) | open tail | recent window |
      block 0    each block_size tokens on a grid from token 0, quantized once    the live form's precision
      (L0)       when it leaves the window; dequantized values replace the originals   (fp32, or INT8 codes)

The working buffer is the dense view GroupQueryAttention needs, in the cache's
live form (``layout``): the model's KV dtype, or INT8 codes with the model's static
per-channel scales, which GroupQueryAttention reads itself (``engine/live_forms.py``).
In the INT8 live form every held token is INT8 (sinks and window included: one
past tensor has one dtype), so L1 is the floor tier: a sealed block *is* its INT8
codes, parked as they are, and INT4 demotion rounds a block's values to the INT4
grid and writes them back as INT8 codes. The quantized bytes of demoted blocks
(the at-rest form, what the prefix store keeps between turns) live in the pool.
Eviction removes tokens from the working buffer for real, so the model
attends over fewer tokens; new tokens keep their true RoPE positions
(``position_ids``) until the RoPE table runs out, then cached keys are
re-indexed (see ``rope.py``).
"""

from __future__ import annotations

import time

import numpy as np

from lemonade_inferos.engine.kv import CacheFullError, KVCache, KVLayout
from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.codecs import codec_for_tier
from lemonade_inferos.kvcache.importance import AttentionAccumulator, block_scores, per_layer_rank
from lemonade_inferos.kvcache.plan import TIER_EVICTED, TIER_INT4, TIER_INT8, TIER_L0, KVPlan
from lemonade_inferos.kvcache.pool import BlockPool
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.kvcache.segments import Splice
from lemonade_inferos.kvcache.stats import KVStats, measure
from lemonade_inferos.kvcache.working_buffer import WorkingBuffer



class TieredKVCache(KVCache):
    """A KV cache whose history is quantized and evicted block by block under a :class:`KVPlan`.

    It composes a :class:`DenseKVCache`, the working buffer the model reads and writes (``buffer``), and keeps
    the block table, the importance signal and the quantized bytes (its ``pool``) beside it.

    Args:
        layout: the model's KV shape.
        plan: tiers, thresholds and window.
        rope: the model's RoPE tables, needed to keep generating past the table length; without them the
            cache refuses tokens past it.
        pool: where block metadata and quantized bytes live.
        max_tier: the quality guard's cap (``TIER_INT8`` stops INT4 demotion, ``TIER_L0`` all quantization).
    """

    def __init__(self, layout: KVLayout, plan: KVPlan, rope: RopeTables | None = None,
                 pool: BlockPool | None = None, initial_tokens: int = 256) -> None:
        self.layout = layout
        self.attention = AttentionAccumulator()   # used with importance="attention" only
        self.buffer = WorkingBuffer(layout, initial_tokens, on_grow=self.attention.grow)
        self.attention.grow(self.buffer.capacity)
        self.plan = plan
        self.rope = rope
        self.pool = pool or BlockPool(layout.num_layers)
        self.max_tier = TIER_INT4
        self.blocks: list[KVBlock] = []
        self._sealed_end = 0
        self._next_block_index = 0
        self._evicted_scores: list[np.ndarray] = []
        self.stats = KVStats()
        self.splices: list[Splice] = []  # segment reuse: KV the next prefill places instead of running it
        self._codecs = {tier: codec_for_tier(tier, plan.group_size) for tier in (TIER_INT8, TIER_INT4)}
        # the tier every held token is at: L0 in the model's dtype, L1 in the INT8 live form
        self.floor_tier = TIER_INT8 if layout.live_int8 else TIER_L0

    # -- KVCache: the working buffer's, with tiers around it ---------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.buffer.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.buffer.token_ids

    @property
    def buffers_version(self) -> int:
        return self.buffer.buffers_version

    @property
    def nbytes(self) -> int:
        """Live bytes: the working buffer as allocated plus the quantized bytes of demoted blocks in the pool."""
        return self.buffer.nbytes + self.pool.nbytes

    def ort_values(self):
        return self.buffer.ort_values()

    def arrays(self):
        return self.buffer.arrays()

    def plan_capacity(self, num_tokens: int) -> None:
        self.buffer.plan_capacity(num_tokens)

    def mirror_start(self) -> int:
        return self.buffer.mirror_start()

    def mirror_synced(self, num_tokens: int) -> None:
        self.buffer.mirror_synced(num_tokens)

    def new_positions(self, num_new: int) -> np.ndarray:
        return self.buffer.new_positions(num_new)

    @property
    def wants_attention(self) -> bool:
        return self.plan.importance == "attention"

    def observe_attention(self, probes: list[np.ndarray], num_new: int) -> None:
        if self.plan.importance == "attention":
            self.attention.observe(probes, num_new)

    def _attention_score(self, block: KVBlock) -> np.ndarray:
        return self.attention.block_score(block.start, block.end, self.layout.num_layers)

    def reserve(self, num_new: int) -> None:
        while self.num_tokens + num_new > self.layout.max_tokens and self.plan.evicts and self.blocks:
            self._evict(min(self.blocks, key=lambda b: float(b.importance.mean())))
        if self.num_tokens + num_new > self.layout.max_tokens:
            raise CacheFullError(self.num_tokens + num_new, self.layout.max_tokens)
        if self.rope is not None and self._next_position() + num_new > self.rope.max_positions:
            self._rebase_positions()
        self.buffer.reserve(num_new)

    def commit(self, token_ids) -> None:
        self.buffer.commit(token_ids)
        self._seal_ready_blocks()

    def truncate(self, num_tokens: int) -> None:
        keep = [b for b in self.blocks if b.end <= num_tokens]
        for block in self.blocks[len(keep):]:
            self.pool.free(block)
        self.blocks = keep
        self._sealed_end = min(self._sealed_end, keep[-1].end if keep else 0)
        self.attention.truncate(num_tokens)
        if num_tokens == 0:  # a new sequence: forget the old one's history and counters
            self._evicted_scores.clear()
            self._next_block_index = 0
            self.stats = KVStats()
        self.buffer.truncate(num_tokens)

    def set_plan(self, plan: KVPlan) -> None:
        """Adopt a new plan (e.g. new pressure); already-demoted blocks stay demoted."""
        self.plan = plan
        self._apply_plan()

    # -- sealing and tiers ----------------------------------------------------------------------
    def _next_position(self) -> int:
        n = self.num_tokens
        return int(self.buffer.positions[n - 1]) + 1 if n else 0

    def _seal_ready_blocks(self) -> None:
        plan = self.plan
        if not (plan.quantizes or plan.evicts):
            return
        # blocks sit on a grid from token 0 (the prefix store's grid); the block holding the sinks stays L0
        first_block = -(-plan.sink_tokens // plan.block_size) * plan.block_size
        self._sealed_end = max(self._sealed_end, min(first_block, self.num_tokens))
        sealed_any = False
        while self.num_tokens - self._sealed_end >= plan.recent_window + plan.block_size:
            self._seal(self._sealed_end)
            sealed_any = True
        if sealed_any:
            self._apply_plan()

    def _seal(self, start: int) -> None:
        block = self.pool.allocate(self.plan.block_size)
        block.start = start
        block.tiers[:] = self.floor_tier
        if self.plan.importance == "attention":
            block.scores = self._attention_score(block)
        else:
            keys = [self.buffer.read(layer, 0, start, block.end) for layer in range(self.layout.num_layers)]
            block.scores = block_scores(keys, self.plan.importance, self._next_block_index)
        self._next_block_index += 1
        self.blocks.append(block)
        self._sealed_end = block.end
        self.stats.blocks_sealed += 1

    def pressure(self) -> float:
        """Memory pressure the plan's gates compare against: the controller's, or how full the context is."""
        return max(self.plan.pressure, self.num_tokens / self.layout.max_tokens)

    def _apply_plan(self) -> None:
        if not self.blocks:
            return
        plan, pressure = self.plan, self.pressure()
        if plan.importance == "attention":  # accumulated attention keeps changing: refresh the held blocks
            for block in self.blocks:
                block.scores = self._attention_score(block)
        # rank among every block this sequence ever sealed (evicted ones included), so a threshold of 0.3
        # means "the bottom 30% of the history" and sustained pressure cannot evict more than that
        scores = np.stack([b.scores for b in self.blocks] + self._evicted_scores)
        ranks = per_layer_rank(scores)[:len(self.blocks)]
        for block, rank in zip(self.blocks, ranks):
            block.importance = rank
            target = np.full(rank.shape, TIER_L0, dtype=np.int8)
            target[rank < plan.int8_below] = TIER_INT8
            if pressure > plan.int4_pressure:
                target[rank < plan.int4_below] = TIER_INT4
            target = np.maximum(np.minimum(target, self.max_tier), self.floor_tier)
            for tier in self.tiers_above_floor():
                layers = np.nonzero((target == tier) & (block.tiers < tier))[0]  # one-way: never promote
                if len(layers):
                    self._quantize(block, layers, tier)
        if plan.evicts and pressure > plan.evict_pressure:
            # evict the least important held blocks, but never more than evict_below of the sealed history
            sealed = len(self.blocks) + len(self._evicted_scores)
            budget = int(min(plan.evict_below, 1.0) * sealed) - len(self._evicted_scores)
            candidates = sorted(self.blocks, key=lambda b: float(b.importance.mean()))
            for block in candidates[:max(0, budget)]:
                self._evict(block)

    def tiers_above_floor(self) -> tuple[int, ...]:
        return tuple(t for t in (TIER_INT8, TIER_INT4) if t > self.floor_tier)

    def _quantize(self, block: KVBlock, layers: np.ndarray, tier: int) -> None:
        """Quantize ``layers`` of a block from the working buffer and write the dequantized values back.

        All layers go through the codec in one call (stacked along heads): one numpy pass per block.
        """
        started = time.perf_counter()
        codec, heads = self._codecs[tier], self.layout.num_kv_heads
        for axis, slot in (("token", 0), ("channel", 1)):
            stacked = np.concatenate([self.buffer.read(int(layer), slot, block.start, block.end) for layer in layers],
                                     axis=0)                              # [len(layers) * H, T, D]
            quantized = codec.quantize(stacked, axis)
            restored = codec.dequantize(quantized)
            for index, layer in enumerate(layers):
                self.buffer.write(int(layer), slot, block.start, restored[index * heads:(index + 1) * heads])
                self.pool.store_half(block, int(layer), slot, quantized.slice_heads(index * heads, heads))
        block.tiers[layers] = tier
        self.stats.block_layers_quantized[codec.name] += len(layers)
        self.stats.quantize_seconds += time.perf_counter() - started

    def _evict(self, block: KVBlock) -> None:
        """Remove a block's tokens from the working buffer (compaction) and release its bytes."""
        start, end, n = block.start, block.end, self.num_tokens
        self.buffer.remove(start, end)
        self.attention.remove(start, end, n)
        index = self.blocks.index(block)
        for later in self.blocks[index + 1:]:
            later.start -= end - start
        self._sealed_end -= end - start
        del self.blocks[index]
        self._evicted_scores.append(block.scores.copy())
        block.tiers[:] = TIER_EVICTED
        self.pool.free(block)
        self.stats.blocks_evicted += 1

    def _rebase_positions(self) -> None:
        """Re-index held tokens to positions 0..n-1, rotating their keys to match (see rope.py)."""
        assert self.rope is not None
        n, positions = self.num_tokens, self.buffer.positions
        delta = np.arange(n, dtype=np.int64) - positions[:n]
        for layer in range(self.layout.num_layers):
            # INT8 live form: rotate the dequantized keys and quantize them again (a key pair's envelope does not
            # change under rotation and the scales are calibrated on it: a key stays in range at any position)
            keys = self.buffer.read(layer, 0, 0, n)
            self.rope.rotate(keys, delta)
            if self.layout.live_int8:
                self.buffer.write(layer, 0, 0, keys)
        positions[:n] = np.arange(n)
        for block in self.blocks:  # the at-rest codes must describe the re-rotated keys
            for tier in self.tiers_above_floor():
                layers = np.nonzero(block.tiers == tier)[0]
                if len(layers):
                    block.tiers[layers] = TIER_L0
                    self._quantize(block, layers, tier)
        self.stats.rebases += 1

    # -- segment reuse (segments.py) ----------------------------------------------------------------
    def segment(self, start: int, end: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Copies of tokens ``[start, end)``: float keys and values per layer ``[H, T, D]``, and their positions."""
        layers = range(self.layout.num_layers)
        keys = [np.array(self.buffer.read(layer, 0, start, end), dtype=np.float32) for layer in layers]
        values = [np.array(self.buffer.read(layer, 1, start, end), dtype=np.float32) for layer in layers]
        return keys, values, self.buffer.positions[start:end].copy()

    def stored_segment(self, source: BlockPool, blocks: list[KVBlock]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Float keys and values per layer ``[H, T, D]`` of cached blocks of ``source`` (a prefix store's pool),
        in order: dequantized from their at-rest form (INT8 live codes with this cache's scales)."""
        heads, num_layers = self.layout.num_kv_heads, self.layout.num_layers
        parts: list[list[list[np.ndarray]]] = [[[] for _ in range(num_layers)] for _ in range(2)]
        for stored in blocks:
            for slot, half in enumerate(source.load(stored)):
                floats = self._restored_values(stored.tier, half)
                for layer in range(num_layers):
                    rows = slice(layer * heads, (layer + 1) * heads)
                    parts[slot][layer].append(floats[rows] if floats is not None else
                                              self.layout.scales.dequantize(half[rows], layer, slot))
        keys, values = ([np.concatenate(layer, axis=1).astype(np.float32) for layer in half] for half in parts)
        return keys, values

    def take_splices(self) -> list[Splice]:
        splices, self.splices = self.splices, []
        return splices

    def insert_segment(self, token_ids: list[int], keys: list[np.ndarray], values: list[np.ndarray],
                       old_positions: np.ndarray) -> None:
        """Append KV computed elsewhere after the held tokens: each key rotated from its old RoPE position to
        its new one (values carry no position), written in this cache's live form, then committed like a run
        of the model (blocks seal and follow the plan)."""
        assert self.rope is not None, "a segment without RoPE tables: this indicates a bug in the caller"
        num_new = len(token_ids)
        self.reserve(num_new)
        start = self.num_tokens
        delta = self.new_positions(num_new)[0] - old_positions
        for layer in range(self.layout.num_layers):
            rotated = keys[layer].copy()
            self.rope.rotate(rotated, delta)
            self.buffer.write(layer, 0, start, rotated)
            self.buffer.write(layer, 1, start, values[layer])
        self.commit(token_ids)
        self.stats.segment_tokens += num_new

    # -- prefix store support ------------------------------------------------------------------
    def at_rest(self, start: int, end: int, tier: int, group_size: int) -> tuple[object, object]:
        """Tokens ``[start, end)`` (all layers stacked) in their at-rest form at ``tier``: raw floats for L0, the INT8
        live form's own codes for L1 (no second quantization), KIVI codes otherwise."""
        if tier == TIER_L0:
            return self.buffer.stacked(start, end)
        if tier == TIER_INT8 and self.layout.live_int8:
            return self.buffer.stacked(start, end, codes=True)
        codec = codec_for_tier(tier, group_size)
        keys, values = self.buffer.stacked(start, end)
        return codec.quantize(keys, "token"), codec.quantize(values, "channel")

    def _restored_values(self, tier: int, stored: object) -> np.ndarray | None:
        """Float values of a stored half, or None for INT8 live codes that go into the buffer as they are."""
        if isinstance(stored, np.ndarray):
            return None if stored.dtype == np.int8 else stored
        return self._codecs[tier].dequantize(stored)

    def load_prefix(self, source: BlockPool, block_ids: list[int]) -> None:
        """Fill an empty cache with the cached blocks ``block_ids`` of ``source`` (a prefix store's pool), in order.

        Each block's stacked keys/values (all layers along heads; quantized, INT8 live codes, or raw for an exact
        block) go into the working buffer: codes of this cache's INT8 live form are copied, anything else is
        dequantized (and quantized with the static scales in the INT8 live form). The restored blocks (all but the
        one holding the sinks) become sealed blocks of this cache at their stored tier, holding the stored KIVI
        codes, so they are not quantized again.
        """
        assert self.num_tokens == 0, "load_prefix into a non-empty cache: this indicates a bug in the caller"
        block_size, heads, num_layers = self.plan.block_size, self.layout.num_kv_heads, self.layout.num_layers
        restored = [source.block(block_id) for block_id in block_ids]
        total = sum(len(block.token_ids) for block in restored)
        self.plan_capacity(total)
        self.reserve(total)
        first_block = -(-self.plan.sink_tokens // block_size) * block_size
        for index, stored in enumerate(restored):
            start, tier = index * block_size, max(stored.tier, self.floor_tier)
            halves = source.load(stored)
            floats = [self._restored_values(stored.tier, half) for half in halves]
            for layer in range(num_layers):
                part = slice(layer * heads, (layer + 1) * heads)
                for slot, (half, values) in enumerate(zip(halves, floats)):
                    if values is None:
                        self.buffer.put_codes(layer, slot, start, half[part])
                    else:
                        self.buffer.write(layer, slot, start, values[part])
            if start < first_block:
                continue
            block = self.pool.allocate(len(stored.token_ids))
            block.start = start
            block.tiers[:] = tier
            if tier > self.floor_tier:  # held in the buffer only otherwise, as a freshly sealed block is
                for layer in range(num_layers):
                    self.pool.store(block, layer, halves[0].slice_heads(layer * heads, heads),
                                    halves[1].slice_heads(layer * heads, heads))
            if self.plan.importance == "attention":
                # nothing observed yet: the queries of the request that restores it will score it
                block.scores = self._attention_score(block)
            else:
                keys = [self.buffer.read(layer, 0, start, block.end) for layer in range(num_layers)]
                block.scores = block_scores(keys, self.plan.importance, self._next_block_index)
            self._next_block_index += 1
            self.blocks.append(block)
        self.buffer.hold_prefix([t for block in restored for t in block.token_ids])
        self._sealed_end = max(first_block, len(restored) * block_size) if restored else 0

    # -- reporting -----------------------------------------------------------------------------
    def kv_stats(self) -> KVStats:
        """Bytes and tokens by tier, measured now (``stats.measure``)."""
        return measure(self)
