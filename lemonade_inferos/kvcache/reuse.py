"""Prefix reuse: the best cache for a prompt, and what becomes of a finished one.

Two layers hold earlier sequences: the warm caches (the live caches of the last finished sequences, reused
token-exactly) and the prefix store (32-token blocks at rest, INT8/INT4 or exact, with a disk spill). For a
prompt, :meth:`PrefixReuse.acquire` matches the prompt's prefix against both once, takes whichever holds more
of it and returns the cache truncated to that prefix (the engine then prefills only the rest);
:meth:`PrefixReuse.release` parks a finished cache's blocks in the store and keeps the cache warm.

When the warm cache wins and the plan allows segment reuse (``kv.segment_reuse``), the rest of the prompt is
also searched in it for a run the cache holds shifted (an agent's history that dropped its oldest exchange):
that run's KV is carried on the returned cache as a splice (``segments.py``), which the engine's prefill places
instead of running those tokens, after recomputing the first ones at the seam.

A damaged entry is that entry's fault: a warm cache that cannot be reused is dropped, blocks that cannot be
restored are forgotten (memory and disk), and the prompt is prefilled instead.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from lemonade_inferos.engine.kv import KVLayout
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_L0, KVPlan
from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.segments import MIN_SPLICE, Splice, find_shifted_run, recompute_count, splice_from
from lemonade_inferos.kvcache.stats import KVStats
from lemonade_inferos.kvcache.warm import WarmCaches
from lemonade_inferos.kvcache.reuse_stats import ReuseStats

log = logging.getLogger(__name__)


class PrefixReuse:
    def __init__(self, store: PrefixStore, warm: WarmCaches) -> None:
        self.store = store
        self.warm = warm
        self.segment_tokens = 0   # prompt tokens served from shifted segments since start (warm cache or store)

    def acquire(self, prompt: list[int], salt: bytes, layout: KVLayout, plan: KVPlan, max_tier: int,
                new_cache: Callable[[], TieredKVCache]) -> tuple[TieredKVCache, int]:
        """The cache to run ``prompt`` in under ``plan`` and the guard's ``max_tier``, and how many of the
        prompt's tokens it already holds (``cache.token_ids == prompt[:reused]``)."""
        # a cache that may not quantize reuses exact KV only: the guard's last step and kv.mode disabled mean
        # full precision, for the prefix too
        usable = TIER_L0 if max_tier == TIER_L0 or not plan.quantizes else max_tier
        block = self.store.block_size
        warm, common = self.warm.take(prompt, salt, layout, usable)
        whole_blocks = (len(prompt) - 1) // block * block
        stored = [] if common >= whole_blocks else self.store.lookup(prompt, salt, usable, record=False)
        cache, reused = None, 0
        if warm is not None and common >= len(stored) * block:
            self.store.release(stored)  # pinned by the lookup, not needed
            splice = self._shifted_segment(warm, prompt, common, plan)
            cache, reused = self._reuse_warm(warm, common, plan, max_tier), common
            if cache is not None and splice is not None:
                self._attach(cache, splice)
            if cache is None:  # that warm cache was damaged: the store serves what it has
                stored = self.store.lookup(prompt, salt, usable, record=False)
        elif warm is not None:
            self.warm.put(warm, salt)  # the store has more of this prompt; keep the warm one for its own chat
        if cache is None:
            cache, reused = self._restore(stored, max_tier, new_cache)  # releases the pinned blocks
        if not cache.splices and plan.segment_recompute is not None and cache.rope is not None:
            splice = self._stored_segment(cache, prompt, reused, salt, plan.segment_recompute, usable)
            if splice is not None:
                self._attach(cache, splice)
        self.store.record_lookup(len(prompt), reused)
        return cache, reused

    def _attach(self, cache: TieredKVCache, splice: Splice) -> None:
        cache.splices = [splice]
        cache.stats.segment_recomputed_tokens = splice.recomputed
        self.segment_tokens += len(splice)

    def _stored_segment(self, cache: TieredKVCache, prompt: list[int], reused: int, salt: bytes, share: float,
                        max_tier: int) -> Splice | None:
        """A splice from prefix-store blocks the prompt holds shifted (found by their own tokens), whole blocks
        at the seam recomputed; None when there is none worth it."""
        start, blocks, origins = self.store.shifted_run(prompt, reused, salt, max_tier)
        try:
            size = self.store.block_size
            skip = -(-recompute_count(len(blocks) * size, share) // size)
            if len(blocks) - skip < 1:
                return None
            used = blocks[skip:]
            keys, values = cache.stored_segment(self.store.pool, used)
            positions = np.concatenate([np.arange(o, o + size) for o in origins[skip:]])
            self.store.record_segment(len(used))
            return Splice(start + skip * size, [t for b in used for t in b.token_ids], keys, values, positions,
                          skip * size)
        except Exception:
            log.exception("a shifted segment from the prefix store failed; prefilling the prompt")
            return None
        finally:
            self.store.release(blocks)

    def release(self, cache: TieredKVCache, salt: bytes, keep_warm: bool) -> None:
        """Park a finished cache's full blocks in the store; keep the cache itself warm when asked."""
        self.store.park(cache, salt)
        if keep_warm:
            self.warm.put(cache, salt)

    @staticmethod
    def _shifted_segment(warm: TieredKVCache, prompt: list[int], common: int, plan: KVPlan) -> Splice | None:
        """The warm cache's KV for a run of the prompt it holds shifted (an agent's sliding history), before the
        cache is truncated to the common prefix; None when segment reuse is off or there is no such run."""
        if plan.segment_recompute is None or warm.rope is None or warm.num_tokens != len(warm.token_ids):
            return None
        try:
            run = find_shifted_run(warm.token_ids, prompt, common)
            if run is None or run.length - recompute_count(run.length, plan.segment_recompute) < MIN_SPLICE:
                return None
            return splice_from(warm, run, plan.segment_recompute)
        except Exception:  # a segment is an optimisation: the prompt is prefilled instead
            log.exception("finding a shifted segment failed; prefilling the prompt")
            return None

    def _reuse_warm(self, warm: TieredKVCache, common: int, plan: KVPlan, max_tier: int) -> TieredKVCache | None:
        try:
            warm.truncate(common)
            warm.stats = KVStats()  # this request's work, not the earlier turns'
            warm.max_tier = max_tier  # before the plan is applied again
            warm.set_plan(plan)
            return warm
        except Exception:
            log.exception("reusing a warm cache failed; dropping it")
            return None

    def _restore(self, stored: list[KVBlock], max_tier: int, new_cache: Callable[[], TieredKVCache]) -> tuple[TieredKVCache, int]:
        cache = self._fresh(max_tier, new_cache)
        try:
            return cache, self.store.restore(cache, stored)
        except Exception:
            log.exception("restoring %d prefix blocks failed; dropping them and prefilling the prompt", len(stored))
            self.store.discard(stored)
            return self._fresh(max_tier, new_cache), 0

    @staticmethod
    def _fresh(max_tier: int, new_cache: Callable[[], TieredKVCache]) -> TieredKVCache:
        cache = new_cache()
        cache.max_tier = max_tier
        return cache

    def snapshot(self) -> ReuseStats:
        return ReuseStats(store=self.store.snapshot(), warm=self.warm.snapshot(), segment_tokens=self.segment_tokens)

    def stats(self) -> dict[str, object]:
        return self.snapshot().to_dict()
