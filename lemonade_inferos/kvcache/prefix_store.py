"""Prefix store: KV blocks of earlier requests, at rest in INT8/INT4, restored on a prefix hit.

Keys are a hash chain over full blocks of token ids (vLLM style): a block's hash
covers its own ids and its parent's hash, salted with the model fingerprint and
KV format, so a hit on block i means the whole prefix up to i matches. The
blocks are cached in a :class:`~lemonade_inferos.kvcache.pool.BlockPool` (its hash
index, LRU within the byte budget); a sequence is stamped tail-first so the
shared prefixes (system prompt, earlier turns) are the last to go.

At rest each block is one stacked INT8 tensor for keys and one for values
(all layers), or INT4 when the live cache had already demoted any of its layers.
A cache in the INT8 live form parks its INT8 blocks as the codes it holds (the
salt names the live form and its scales, so only caches of that form read them).
A sequence whose cache may not quantize (``kv.mode`` disabled, or the quality
guard at its last step) is kept at full precision instead, and a lookup under
such a cache stops at the first quantized block: what it restores is exactly
what a cold prefill would compute.

Optional spill to disk: the pool's lower tier (``disk_tier.py``) takes blocks
pushed out of the memory budget and brings them back on a hit; ``flush()`` writes
every block at shutdown, so a restarted server still has the conversations it served.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.disk_tier import DiskTier
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0
from lemonade_inferos.kvcache.pool import BlockPool


def block_hashes(token_ids: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes, parent = [], salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = np.asarray(token_ids[start:start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PrefixStore:
    """Cached blocks by chained hash, LRU within ``budget_bytes``. Thread-safe (requests on different models
    share it): every pool operation runs under the store's lock, and blocks handed out by :meth:`lookup` stay
    pinned (never evicted) until :meth:`release`."""

    def __init__(self, budget_bytes: int, block_size: int = 32, group_size: int = 32,
                 spill_dir: Path | None = None, spill_budget_bytes: int = 0) -> None:
        self.spill = DiskTier(spill_dir, spill_budget_bytes) if spill_dir and spill_budget_bytes > 0 else None
        # a cached block holds its layers stacked, at one tier: one tier entry per block
        self.pool = BlockPool(1, budget_bytes, lower=self.spill)
        self.block_size = block_size
        self.group_size = group_size
        self._lock = threading.Lock()
        self.hits_tokens = 0
        self.lookup_tokens = 0

    @staticmethod
    def salt(model_fingerprint: str, kv_format: str) -> bytes:
        return hashlib.blake2b(f"{model_fingerprint}|{kv_format}".encode(), digest_size=16).digest()

    @property
    def budget_bytes(self) -> int:
        return self.pool.budget_bytes or 0

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    # -- park ------------------------------------------------------------------------------------
    def park(self, cache: TieredKVCache, salt: bytes) -> int:
        """Keep the full blocks of a finished sequence; returns how many new blocks were stored."""
        if cache.num_tokens != len(cache.token_ids) or cache.num_tokens < self.block_size:
            return 0  # evicted tokens: the working buffer no longer lines up with the token ids
        token_ids = cache.token_ids[: cache.num_tokens // self.block_size * self.block_size]
        hashes = block_hashes(token_ids, self.block_size, salt)
        demoted = {b.start // self.block_size for b in cache.blocks if (b.tiers == TIER_INT4).any()}
        exact = not cache.layout.live_int8 and (cache.max_tier == TIER_L0 or not cache.plan.quantizes)
        new_blocks = 0
        with self._lock:
            pool = self.pool
            for index, block_hash in enumerate(hashes):
                held = pool.cached(block_hash, reach_lower=False)
                if held is not None and (held.tier == TIER_L0 or not exact):
                    continue  # an exact copy replaces a quantized one; anything else is kept as it is
                start = index * self.block_size
                tier = TIER_L0 if exact else TIER_INT4 if index in demoted else TIER_INT8
                keys, values = cache.at_rest(start, start + self.block_size, tier, self.group_size)
                pool.cache(block_hash, tuple(token_ids[start:start + self.block_size]), tier, keys, values)
                new_blocks += 1
            for block_hash in reversed(hashes):  # tail first: parents end up most recently used
                pool.touch(pool.cached(block_hash, reach_lower=False))
            pool.evict_to_budget()
        return new_blocks

    def flush(self) -> int:
        """Write every in-memory block to the spill folder (shutdown); returns how many were written."""
        with self._lock:
            return self.pool.spill_all()

    def drop_above(self, max_tier: int) -> int:
        """Forget blocks stored at a tier beyond ``max_tier`` (the guard stepped back): they will be re-prefilled
        from token ids. Returns how many were dropped."""
        with self._lock:
            doomed = [b.block_hash for b in self.pool.cached_blocks() if b.tier > max_tier]
            for block_hash in doomed:
                self.pool.uncache(block_hash)
        return len(doomed)

    def discard(self, blocks: list[KVBlock]) -> None:
        """Forget ``blocks`` in memory and on disk: restoring them failed, so they must not be offered again."""
        with self._lock:
            for block in blocks:
                if block.block_hash is not None:
                    self.pool.uncache(block.block_hash, lower_too=True)

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self.pool.budget_bytes = budget_bytes
            self.pool.evict_to_budget()

    # -- restore ---------------------------------------------------------------------------------
    def lookup(self, prompt_ids: list[int], salt: bytes, max_tier: int = TIER_INT4,
               record: bool = True) -> list[KVBlock]:
        """The cached blocks of the longest cached prefix (at least one prompt token is left to run), pinned
        until :meth:`release` (or :meth:`restore`, which releases them).

        The prefix ends before the first block stored beyond ``max_tier`` (``TIER_L0``: exact blocks only).
        ``record=False`` leaves the hit counters to the caller (who may serve the prompt from elsewhere).
        """
        usable = (len(prompt_ids) - 1) // self.block_size * self.block_size
        found: list[KVBlock] = []
        with self._lock:
            pool = self.pool
            for block_hash in block_hashes(prompt_ids[:usable], self.block_size, salt):
                block = pool.cached(block_hash)
                if block is None or block.tier > max_tier:
                    break
                pool.pin([block])  # before the next miss may bring a block back and evict to make room
                found.append(block)
            if record:
                self.lookup_tokens += len(prompt_ids)
                self.hits_tokens += len(found) * self.block_size
            for block in reversed(found):  # parents most recent, as in park()
                pool.touch(block)
            pool.evict_to_budget()
        return found

    def release(self, blocks: list[KVBlock]) -> None:
        """Unpin blocks :meth:`lookup` handed out."""
        with self._lock:
            self.pool.unpin(blocks)
            self.pool.evict_to_budget()

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count a prompt and the tokens of it served from cache (the hit rate the controller publishes)."""
        with self._lock:
            self.lookup_tokens += prompt_tokens
            self.hits_tokens += hit_tokens

    def restore(self, cache: TieredKVCache, blocks: list[KVBlock]) -> int:
        """Load pinned ``blocks`` into an empty cache and release them; returns the number of tokens restored."""
        try:
            if blocks:
                cache.load_prefix(self.pool, [block.block_id for block in blocks])
            return len(blocks) * self.block_size
        finally:
            self.release(blocks)

    @property
    def hit_rate(self) -> float | None:
        return self.hits_tokens / self.lookup_tokens if self.lookup_tokens else None

    def stats(self) -> dict[str, object]:
        return {"blocks": len(self.pool.cached_blocks()), "bytes": self.pool.nbytes, "budget_bytes": self.budget_bytes,
                "hit_tokens": self.hits_tokens, "lookup_tokens": self.lookup_tokens, "hit_rate": self.hit_rate,
                "evicted_blocks": self.pool.evicted_blocks,
                "spill": self.spill.stats() if self.spill is not None else None}
