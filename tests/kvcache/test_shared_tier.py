"""The shared prefix tier on a real redis-server: blocks one store parks are hits for another store, corrupt
and foreign values are ignored, and a server that is down costs a miss, never an error."""

from __future__ import annotations

import time

import numpy as np

from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import named_plan
from lemonade_inferos.kvcache.prefix_store import PrefixStore, block_hashes
from lemonade_inferos.kvcache.shared_tier import KEY_PREFIX, SharedTier

from .test_manager import LAYOUT, fill

SALT = PrefixStore.salt("model", "format")


def _sequence(num_tokens: int, seed: int = 0) -> TieredKVCache:
    cache = TieredKVCache(LAYOUT, named_plan("int8", recent_window=32))
    fill(cache, num_tokens, seed=seed)
    return cache


def _restored(store: PrefixStore, prompt: list[int]) -> TieredKVCache:
    cache = TieredKVCache(LAYOUT, named_plan("int8", recent_window=32))
    store.restore(cache, store.lookup(prompt, SALT))
    return cache


def test_a_block_one_store_parks_is_a_hit_for_another(redis_server):
    redis_server.client().flushall()
    first = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    cache = _sequence(200)
    assert first.park(cache, SALT) == 6
    assert first.shared.drain()
    assert first.shared.stats()["writes"] == 6

    second = PrefixStore(2**30, shared=SharedTier(redis_server.url))   # another process: nothing in memory
    restored = _restored(second, cache.token_ids + [1])
    assert restored.token_ids == cache.token_ids[:192]
    local = _restored(first, cache.token_ids + [1])
    np.testing.assert_array_equal(restored.buffer.keys[1][0, :, :192], local.buffer.keys[1][0, :, :192])
    assert second.stats()["hit_blocks_by_tier"] == {"memory": 0, "disk": 0, "shared": 6}
    assert second.shared.stats()["bytes_read"] > 0 and second.shared.stats()["latency_count"] > 0
    again = second.lookup(cache.token_ids + [1], SALT)   # now in memory: no round trip
    second.release(again)
    assert second.stats()["hit_blocks_by_tier"]["memory"] == 6


def test_a_different_model_or_format_never_reads_the_blocks(redis_server):
    redis_server.client().flushall()
    store = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    cache = _sequence(128)
    store.park(cache, SALT)
    store.shared.drain()
    other = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    assert other.lookup(cache.token_ids + [1], PrefixStore.salt("model", "another format")) == []


def test_corrupt_and_foreign_values_are_ignored(redis_server):
    client = redis_server.client()
    client.flushall()
    store = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    cache = _sequence(128, seed=3)
    store.park(cache, SALT)
    store.shared.drain()
    hashes = block_hashes(cache.token_ids, 32, SALT)
    client.set(KEY_PREFIX + hashes[1].hex(), client.get(KEY_PREFIX + hashes[2].hex()))   # another block's bytes
    client.set(KEY_PREFIX + hashes[2].hex(), b"not a block at all")
    reader = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    found = reader.lookup(cache.token_ids + [1], SALT)
    assert len(found) == 1, "only the first block is the block its key names"
    reader.release(found)
    assert reader.shared.stats()["corrupt"] == 1   # the read stops at the first bad value


def test_a_store_that_is_down_is_a_miss_and_backs_off(own_redis_server):
    tier = SharedTier(own_redis_server.url, timeout_s=0.2)
    store = PrefixStore(2**30, shared=tier)
    own_redis_server.stop()
    cache = _sequence(96)
    store.park(cache, SALT)   # write-through to a dead server: dropped, counted
    assert tier.drain()
    started = time.perf_counter()
    other = PrefixStore(2**30, shared=tier)
    assert other.lookup(cache.token_ids + [1], SALT) == []
    assert time.perf_counter() - started < 1.0
    stats = tier.stats()
    assert stats["errors"] >= 1 and not stats["up"] and stats["dropped_writes"] >= 1
    skipped = stats["skipped_down"]
    other.lookup(cache.token_ids + [1], SALT)
    assert tier.stats()["skipped_down"] == skipped + 1, "inside the backoff the tier is not even tried"

    own_redis_server.start()
    deadline = time.monotonic() + 5
    while not tier.may_try() and time.monotonic() < deadline:
        time.sleep(0.05)
    later = _sequence(96, seed=9)
    later.token_ids[:] = [t + 500 for t in later.token_ids]   # another conversation
    assert store.park(later, SALT) == 3
    assert tier.drain() and tier.stats()["writes"] == 3, "back after the backoff"


def test_a_server_finds_a_siblings_blocks_after_a_changed_prefix_through_the_shared_segment_index(redis_server):
    redis_server.client().flushall()
    first = PrefixStore(2**30, shared=SharedTier(redis_server.url))
    cache = _sequence(200)
    first.park(cache, SALT)
    assert first.shared.drain() and first.shared.stats()["segment_writes"] == 6
    second = PrefixStore(2**30, shared=SharedTier(redis_server.url))  # never saw the sequence: nothing local
    prompt = list(range(5000, 5040)) + cache.token_ids[64:200] + [1]  # another history before the same blocks
    position, blocks, origins = second.shifted_run(prompt, 0, SALT, max_tier=2)
    try:
        assert position == 40 and origins == [64, 96, 128, 160]
        assert [b.token_ids for b in blocks] == [tuple(cache.token_ids[o:o + 32]) for o in origins]
    finally:
        second.release(blocks)
    assert second.shared.stats()["segment_hits"] >= 1
    assert second.stats()["hit_blocks_by_tier"]["shared"] >= 4
    redis_server.client().set("inferos:seg:v1:" + "00" * 16, b"short")  # a foreign value: ignored, counted
    assert second.shared.read_segments([bytes(16)]) == [None] and second.shared.stats()["corrupt"] >= 1
