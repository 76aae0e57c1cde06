"""Warm caches: a finished sequence's live cache serves its next turn token-exactly."""

from __future__ import annotations

from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0, named_plan
from lemonade_inferos.kvcache.warm import WarmCaches

from .test_manager import LAYOUT, fill

SALT = b"model|format"


def _finished(num_tokens: int, plan: str = "int8", seed: int = 0) -> TieredKVCache:
    cache = TieredKVCache(LAYOUT, named_plan(plan, recent_window=32))
    fill(cache, num_tokens, seed=seed)
    return cache


def test_the_cache_sharing_the_longest_prefix_is_taken_once():
    warm = WarmCaches(capacity=2)
    short, long = _finished(50), _finished(150)
    warm.put(short, SALT)
    warm.put(long, SALT)
    prompt = long.token_ids + [7, 8]
    cache, common = warm.take(prompt, SALT, LAYOUT, TIER_INT4)
    assert cache is long and common == 150  # every held token, not a whole number of blocks
    cache, common = warm.take(prompt, SALT, LAYOUT, TIER_INT4)
    assert cache is short and common == 50  # the long one is in use until it is put back


def test_a_few_shared_tokens_are_not_reused():
    warm = WarmCaches(min_tokens=32)
    cache = _finished(100)
    warm.put(cache, SALT)
    assert warm.take(cache.token_ids[:20] + [9999] * 50, SALT, LAYOUT, TIER_INT4) == (None, 0)
    assert warm.take(cache.token_ids[:40] + [9999] * 50, SALT, LAYOUT, TIER_INT4) == (cache, 40)


def test_a_prompt_always_leaves_one_token_to_run():
    warm = WarmCaches()
    cache = _finished(40)
    warm.put(cache, SALT)
    assert warm.take(cache.token_ids, SALT, LAYOUT, TIER_INT4) == (cache, 39)


def test_capacity_keeps_the_most_recent():
    warm = WarmCaches(capacity=1)
    first, second = _finished(40, seed=1), _finished(40, seed=2)
    second.token_ids[:] = [t + 1000 for t in second.token_ids]
    warm.put(first, SALT)
    warm.put(second, SALT)
    assert warm.take(first.token_ids + [1], SALT, LAYOUT, TIER_INT4) == (None, 0)
    assert warm.take(second.token_ids + [1], SALT, LAYOUT, TIER_INT4)[0] is second


def test_caches_that_cannot_serve_are_dropped():
    warm = WarmCaches(capacity=4)
    other_model = _finished(100)
    demoted = _finished(200, plan="int4")
    assert any((b.tiers == TIER_INT4).any() for b in demoted.blocks)
    warm.put(other_model, b"another model")
    warm.put(demoted, SALT)
    assert warm.take(demoted.token_ids + [1], SALT, LAYOUT, TIER_INT8) == (None, 0)  # the guard capped INT8
    assert warm.stats()["caches"] == 0


def test_exact_reuse_refuses_quantized_caches_and_evicted_ones_are_not_kept():
    warm = WarmCaches(capacity=4)
    quantized = _finished(200)
    warm.put(quantized, SALT)
    assert warm.take(quantized.token_ids + [1], SALT, LAYOUT, TIER_L0) == (None, 0)
    evicted = _finished(100)
    evicted.token_ids[:] = evicted.token_ids + [1, 2]  # more ids committed than tokens held: it has evicted
    warm.put(evicted, SALT)
    assert warm.stats()["caches"] == 0


def test_working_buffers_stay_within_the_byte_budget():
    one = _finished(100)
    warm = WarmCaches(capacity=4, max_bytes=int(one.nbytes * 2.5))
    caches = [_finished(100, seed=s) for s in range(3)]
    for index, cache in enumerate(caches):
        cache.token_ids[:] = [t + 1000 * index for t in cache.token_ids]
        warm.put(cache, SALT)
    assert warm.stats()["caches"] == 2 and warm.stats()["bytes"] <= warm.max_bytes  # the oldest went first
    assert warm.take(caches[0].token_ids + [1], SALT, LAYOUT, TIER_INT4) == (None, 0)
    tiny = WarmCaches(capacity=4, max_bytes=one.nbytes - 1)
    tiny.put(one, SALT)
    assert tiny.stats()["caches"] == 0
