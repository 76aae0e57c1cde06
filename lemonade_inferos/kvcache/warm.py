"""Warm caches: the live caches of the last finished sequences, kept for their next turn.

The prefix store keeps whole blocks at rest (INT8/INT4): restoring them costs a
dequantize-and-copy, and the last partial block of a turn is recomputed. A chat
client or an agent usually sends its next turn right away, extending the
sequence it just finished, so the plugin also keeps that sequence's live cache
(as llama.cpp keeps a slot's cache): the next turn reuses it token-exactly, at
the precision it had, with nothing to restore. A warm cache is taken by one
request at a time and handed back after it; the prefix store remains the
fallback for every other conversation.
"""

from __future__ import annotations

import threading

from lemonade_inferos.engine.kv import KVLayout, common_prefix
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.reuse_stats import WarmStats


class WarmCaches:
    """At most ``capacity`` finished caches, most recent first. Thread-safe.

    A cache is reused for a prompt sharing at least ``min_tokens`` with it (the prefix store's block size).
    Their working buffers (allocated bytes) stay within ``max_bytes``: the oldest go first, and a cache larger
    than the whole budget is not kept (its blocks are in the prefix store anyway).
    """

    def __init__(self, capacity: int = 1, min_tokens: int = 32, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self.max_bytes = max_bytes
        self._caches: list[tuple[bytes, TieredKVCache]] = []  # (prefix salt: model and KV format, cache)
        self._lock = threading.Lock()
        self.hits = 0
        self.hit_tokens = 0

    def take(self, prompt_ids: list[int], salt: bytes, layout: KVLayout, max_tier: int
             ) -> tuple[TieredKVCache | None, int]:
        """Remove and return the cache sharing the longest prefix with ``prompt_ids``, and that length.

        Caches that can no longer serve any prompt (another model or KV format, tokens evicted, blocks beyond
        the quality guard's cap) are dropped on the way.
        """
        with self._lock:
            self._caches = [(s, c) for s, c in self._caches if s == salt and self._usable(c, layout, max_tier)]
            scored = [(common_prefix(c.token_ids, prompt_ids), s, c) for s, c in self._caches]
            common, _, best = max(scored, key=lambda item: item[0], default=(0, None, None))
            if best is None or common < self.min_tokens:
                return None, 0  # a few shared template tokens are not worth changing the prefill's chunking
            self._caches = [(s, c) for s, c in self._caches if c is not best]
            self.hits += 1
            self.hit_tokens += common
            return best, common

    def put(self, cache: TieredKVCache, salt: bytes) -> None:
        """Keep a finished cache for its next turn (a cache that has evicted cannot line up with a prompt)."""
        if self.capacity <= 0 or cache.num_tokens != len(cache.token_ids) or cache.num_tokens == 0:
            return
        if self.max_bytes is not None and cache.nbytes > self.max_bytes:
            return
        with self._lock:
            self._caches = [(salt, cache)] + [(s, c) for s, c in self._caches if c is not cache]
            del self._caches[self.capacity:]
            while self.max_bytes is not None and sum(c.nbytes for _, c in self._caches) > self.max_bytes:
                self._caches.pop()

    def configure(self, capacity: int, max_bytes: int | None) -> None:
        """New limits (a settings reload): caches beyond them are dropped now."""
        with self._lock:
            self.capacity, self.max_bytes = capacity, max_bytes
            del self._caches[max(0, capacity):]
            while self.max_bytes is not None and sum(c.nbytes for _, c in self._caches) > self.max_bytes:
                self._caches.pop()

    def clear(self) -> int:
        with self._lock:
            dropped, self._caches = len(self._caches), []
        return dropped

    @staticmethod
    def _usable(cache: TieredKVCache, layout: KVLayout, max_tier: int) -> bool:
        return (cache.layout == layout and cache.num_tokens == len(cache.token_ids)
                and all(int(b.tiers.max(initial=0)) <= max_tier for b in cache.blocks))

    def snapshot(self) -> WarmStats:
        with self._lock:
            caches = [c for _, c in self._caches]
            return WarmStats(caches=len(caches), capacity=self.capacity, tokens=sum(c.num_tokens for c in caches),
                             bytes=sum(c.nbytes for c in caches), hits=self.hits, hit_tokens=self.hit_tokens)

    def stats(self) -> dict[str, object]:
        return self.snapshot().to_dict()
