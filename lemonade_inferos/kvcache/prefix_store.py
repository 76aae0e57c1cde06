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

Optional shared tier under both (``shared_tier.py``, Valkey/Redis): every new block
is written through at park time (queued, sent in the background), and a lookup
that misses memory and disk reads the rest of the prefix from it, so servers of
the same model share their hits and a server on an empty machine gets them back.
Hits are counted by the tier that served them (memory, disk, shared).
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
from lemonade_inferos.kvcache.shared_tier import SharedTier
from lemonade_inferos.kvcache.reuse_stats import PrefixStoreStats


def block_hashes(token_ids: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes, parent = [], salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chained_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def chained_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def content_key(salt: bytes, tokens: list[int]) -> bytes:
    """A block's own tokens (with the salt: same model and KV format), whatever came before it: the segment
    index, which finds a block again when the prefix before it changed."""
    return hashlib.blake2b(b"content|" + salt + np.asarray(tokens, dtype=np.int64).tobytes(),
                           digest_size=16).digest()


class PrefixStore:
    """Cached blocks by chained hash, LRU within ``budget_bytes``. Thread-safe (requests on different models
    share it): every pool operation runs under the store's lock, and blocks handed out by :meth:`lookup` stay
    pinned (never evicted) until :meth:`release`."""

    def __init__(self, budget_bytes: int, block_size: int = 32, group_size: int = 32,
                 spill_dir: Path | None = None, spill_budget_bytes: int = 0, shared: SharedTier | None = None) -> None:
        self.spill = DiskTier(spill_dir, spill_budget_bytes) if spill_dir and spill_budget_bytes > 0 else None
        self.shared = shared
        # a cached block holds its layers stacked, at one tier: one tier entry per block
        self.pool = BlockPool(1, budget_bytes, lower=self.spill)
        self.block_size = block_size
        self.group_size = group_size
        self._lock = threading.Lock()
        self.hits_tokens = 0
        self.lookup_tokens = 0
        self.hit_blocks_by_tier = {"memory": 0, "disk": 0, "shared": 0}
        # the segment index: content key -> (chained hash, the block's position in the sequence it was parked from)
        self._by_content: dict[bytes, tuple[bytes, int]] = {}
        self.segment_blocks = 0

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
                tokens = tuple(token_ids[start:start + self.block_size])
                block = pool.cache(block_hash, tokens, tier, keys, values)
                content = content_key(salt, list(tokens))
                self._by_content[content] = (block_hash, start)
                if self.shared is not None:
                    self.shared.write(block, keys, values)
                    self.shared.write_segment(content, block_hash, start)
                new_blocks += 1
            for block_hash in reversed(hashes):  # tail first: parents end up most recently used
                pool.touch(pool.cached(block_hash, reach_lower=False))
            pool.evict_to_budget()
            self._bound_index()
        return new_blocks

    def _bound_index(self) -> None:
        """Keep the segment index near the blocks that exist (memory or disk): forget entries of blocks gone."""
        spill = self.spill if self.spill is not None else ()
        if len(self._by_content) > 2 * (len(self.pool.cached_blocks()) + len(spill)) + 1024:
            self._by_content = {k: v for k, v in self._by_content.items()
                                if self.pool.cached(v[0], reach_lower=False) is not None or v[0] in spill}

    def shifted_run(self, prompt_ids: list[int], start: int, salt: bytes, max_tier: int, max_lead: int = 64
                    ) -> tuple[int, list[KVBlock], list[int]]:
        """The longest chain of stored blocks matching the prompt from a position within ``max_lead`` of
        ``start`` (found by the segment index, followed by the chain), pinned until :meth:`release`: the
        prompt position it begins at, the blocks, and each block's position in the sequence it came from."""
        best: tuple[int, list[KVBlock], list[int]] = (start, [], [])
        bs = self.block_size
        with self._lock:
            last = min(start + max_lead, len(prompt_ids) - 1 - bs)
            for q in range(start, last + 1):
                entry = self._by_content.get(content_key(salt, prompt_ids[q:q + bs]))
                if entry is None:
                    continue
                run, origins, parent = self._follow(prompt_ids, q, entry, max_tier)
                if len(run) > len(best[1]):
                    best = (q, run, origins)
                if q + len(run) * bs >= len(prompt_ids) - 1 - bs:
                    break  # nothing later can be longer
            if not best[1] and self.shared is not None:
                best = self._shifted_from_shared(prompt_ids, start, last, salt, max_tier) or best
            self.pool.pin(best[1])
        return best

    def _shifted_from_shared(self, prompt_ids: list[int], start: int, last: int, salt: bytes, max_tier: int
                             ) -> tuple[int, list[KVBlock], list[int]] | None:
        """The segment index on the shared tier (another server parked the blocks): the first position whose
        block it knows, with the chain after it brought into memory (under the lock, as :meth:`lookup`'s reads)."""
        bs = self.block_size
        positions = list(range(start, last + 1))
        contents = [content_key(salt, prompt_ids[q:q + bs]) for q in positions]
        for q, content, entry in zip(positions, contents, self.shared.read_segments(contents)):
            if entry is None:
                continue
            hashes = [entry[0]]
            for p in range(q + bs, len(prompt_ids) - bs, bs):  # the prompt's last token always runs
                hashes.append(chained_hash(hashes[-1], prompt_ids[p:p + bs]))
            fetched = self._from_shared(hashes, max_tier)
            self.pool.unpin(fetched)  # shifted_run pins what it hands out
            if fetched:
                self._by_content[content] = entry
                run, origins, _ = self._follow(prompt_ids, q, entry, max_tier)
                return q, run, origins
        return None

    def record_segment(self, num_blocks: int) -> None:
        """Count blocks a request took from :meth:`shifted_run` (the segment hits)."""
        with self._lock:
            self.segment_blocks += num_blocks

    def _follow(self, prompt_ids: list[int], q: int, entry: tuple[bytes, int], max_tier: int
                ) -> tuple[list[KVBlock], list[int], bytes]:
        bs = self.block_size
        block_hash, origin = entry
        run, origins = [], []
        while True:
            block = self.pool.cached(block_hash)
            if block is None or block.tier > max_tier:
                break
            run.append(block)
            origins.append(origin)
            q, origin = q + bs, origin + bs
            if q + bs > len(prompt_ids) - 1:  # the prompt's last token always runs
                break
            block_hash = chained_hash(block_hash, prompt_ids[q:q + bs])
        return run, origins, block_hash

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
            doomed = [block.block_hash for block in blocks if block.block_hash is not None]
            for block_hash in doomed:
                self.pool.uncache(block_hash, lower_too=True)
        if self.shared is not None:
            self.shared.discard(doomed)

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
        hashes = block_hashes(prompt_ids[:usable], self.block_size, salt)
        with self._lock:
            pool = self.pool
            for index, block_hash in enumerate(hashes):
                block, where = pool.cached(block_hash, reach_lower=False), "memory"
                if block is None:
                    block, where = pool.cached(block_hash), "disk"
                if block is None:
                    found += self._from_shared(hashes[index:], max_tier)
                    break
                if block.tier > max_tier:
                    break
                pool.pin([block])  # before the next miss may bring a block back and evict to make room
                found.append(block)
                self.hit_blocks_by_tier[where] += 1
            if record:
                self.lookup_tokens += len(prompt_ids)
                self.hits_tokens += len(found) * self.block_size
            for block in reversed(found):  # parents most recent, as in park()
                pool.touch(block)
            pool.evict_to_budget()
        return found

    def _from_shared(self, hashes: list[bytes], max_tier: int) -> list[KVBlock]:
        """The leading run of ``hashes`` the shared tier holds, cached in memory and pinned (under the lock)."""
        if self.shared is None:
            return []
        found = []
        for block_hash, (token_ids, tier, keys, values) in zip(hashes, self.shared.read_prefix(hashes)):
            if tier > max_tier:
                break
            block = self.pool.cache(block_hash, token_ids, tier, keys, values)
            self.pool.pin([block])
            found.append(block)
        self.hit_blocks_by_tier["shared"] += len(found)
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

    def snapshot(self) -> PrefixStoreStats:
        return PrefixStoreStats(
            blocks=len(self.pool.cached_blocks()), bytes=self.pool.nbytes, budget_bytes=self.budget_bytes,
            hit_tokens=self.hits_tokens, lookup_tokens=self.lookup_tokens, evicted_blocks=self.pool.evicted_blocks,
            hit_blocks_by_tier=dict(self.hit_blocks_by_tier), segment_blocks=self.segment_blocks,
            segment_index_entries=len(self._by_content),
            spill=self.spill.snapshot() if self.spill is not None else None,
            shared=self.shared.snapshot() if self.shared is not None else None)

    def stats(self) -> dict[str, object]:
        return self.snapshot().to_dict()
