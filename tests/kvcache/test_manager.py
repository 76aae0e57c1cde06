"""The tiered cache on synthetic K/V: tiers, one-way demotion, eviction compaction, byte accounting."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.engine.kv import CacheFullError, KVLayout
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import (TIER_INT4, TIER_INT8, TIER_L0, KVPlan, named_plan, plan_for_mode)
from lemonade_inferos.kvcache.rope import RopeTables

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=64, max_tokens=1024)


def fill(cache: TieredKVCache, num_tokens: int, seed: int = 0, scale_by_token=None) -> None:
    """Append ``num_tokens`` tokens of random K/V, as the model would write them."""
    rng = np.random.default_rng(seed)
    for _ in range(num_tokens):
        cache.reserve(1)
        n = cache.num_tokens
        for keys, values in zip(cache.buffer.keys, cache.buffer.values):
            factor = 1.0 if scale_by_token is None else scale_by_token(n)
            keys[0, :, n] = rng.normal(size=(LAYOUT.num_kv_heads, LAYOUT.head_size)) * factor
            values[0, :, n] = rng.normal(size=(LAYOUT.num_kv_heads, LAYOUT.head_size))
        cache.commit([n % 1000])


def test_blocks_are_sealed_only_outside_sinks_and_window():
    cache = TieredKVCache(LAYOUT, named_plan("int8", recent_window=64))
    fill(cache, 32 + 32 + 64 - 1)
    assert cache.blocks == []  # block 0 holds the sinks and stays L0; block 1 is still in the window
    fill(cache, 1)
    assert [(b.start, b.end) for b in cache.blocks] == [(32, 64)]
    assert (cache.blocks[0].tiers == TIER_INT8).all()


def test_quantized_block_values_in_the_working_buffer_are_the_dequantized_codes():
    cache = TieredKVCache(LAYOUT, named_plan("int4"))
    fill(cache, 200)
    block = cache.blocks[0]
    keys, values = cache.pool.load(block, 1)
    codec = cache._codecs[TIER_INT4]
    np.testing.assert_array_equal(codec.dequantize(keys), cache.buffer.keys[1][0, :, block.start:block.end])
    np.testing.assert_array_equal(codec.dequantize(values), cache.buffer.values[1][0, :, block.start:block.end])


def test_tiers_follow_thresholds_and_pressure():
    plan = KVPlan(int8_below=0.7, int4_below=0.5, int4_pressure=0.6, evict_below=0.0, recent_window=32)
    cache = TieredKVCache(LAYOUT, plan)
    fill(cache, 4 + 32 + 10 * 32)
    ranks = np.stack([b.importance for b in cache.blocks])
    tiers = np.stack([b.tiers for b in cache.blocks])
    assert (tiers[ranks < 0.7] == TIER_INT8).all()  # no pressure: nothing goes to INT4
    assert (ranks[tiers == TIER_L0] >= 0.7).all()
    assert (tiers != TIER_INT4).all()
    cache.set_plan(plan.with_pressure(0.9))
    tiers = np.stack([b.tiers for b in cache.blocks])
    ranks = np.stack([b.importance for b in cache.blocks])
    assert (tiers[ranks < 0.5] == TIER_INT4).all()


def test_demotion_is_one_way():
    plan = named_plan("int4")
    cache = TieredKVCache(LAYOUT, plan)
    fill(cache, 300)
    cache.set_plan(named_plan("int8"))
    assert all((b.tiers == TIER_INT4).all() for b in cache.blocks)


def test_guard_cap_stops_int4_demotion():
    cache = TieredKVCache(LAYOUT, named_plan("int4"))
    cache.max_tier = TIER_INT8
    fill(cache, 300)
    assert all((b.tiers == TIER_INT8).all() for b in cache.blocks)


def test_eviction_removes_tokens_and_keeps_the_rest_in_order_with_true_positions():
    plan = named_plan("int8", recent_window=32)  # seals blocks, never evicts by itself
    cache = TieredKVCache(LAYOUT, plan)
    fill(cache, 32 + 32 + 3 * 32)
    before_keys = cache.buffer.keys[0][0, :, :cache.num_tokens].copy()
    victim = cache.blocks[1]
    start, end = victim.start, victim.end
    cache._evict(victim)
    assert cache.num_tokens == 32 + 32 + 2 * 32
    kept = np.concatenate([before_keys[:, :start], before_keys[:, end:]], axis=1)
    np.testing.assert_array_equal(cache.buffer.keys[0][0, :, :cache.num_tokens], kept)
    expected_positions = np.concatenate([np.arange(start), np.arange(end, 32 + 32 + 3 * 32)])
    np.testing.assert_array_equal(cache.buffer.positions[:cache.num_tokens], expected_positions)
    assert cache.new_positions(1)[0, 0] == 32 + 32 + 3 * 32
    assert [b.start for b in cache.blocks] == [32, 64]


def test_streaming_plan_holds_only_sinks_window_and_open_tail():
    cache = TieredKVCache(LAYOUT, named_plan("streaming", recent_window=32))
    fill(cache, 500)
    assert cache.num_tokens < 32 + 32 + 32 + 1
    assert len(cache.token_ids) == 500
    assert cache.kv_stats().tokens_by_tier["L3_evicted"] == 500 - cache.num_tokens


def test_eviction_takes_the_least_important_blocks():
    # every other block gets keys with large norms: low importance under the key-norm signal
    cache = TieredKVCache(LAYOUT, replace(plan_for_mode("dynamic", recent_window=32), pressure=0.9))
    fill(cache, 4 + 32 + 20 * 32, scale_by_token=lambda n: 5.0 if ((n - 4) // 32) % 2 else 1.0)
    assert cache.stats.blocks_evicted > 0
    loud = [float(np.linalg.norm(k[0, :, b.start:b.end], axis=-1).mean()) for b in cache.blocks
            for k in cache.buffer.keys[:1]]
    # what is left is mostly quiet (important) blocks
    assert sum(n < 20 for n in loud) > sum(n >= 20 for n in loud)


def test_byte_accounting_matches_the_arrays():
    cache = TieredKVCache(LAYOUT, replace(plan_for_mode("dynamic", recent_window=32), pressure=0.7))
    fill(cache, 400)
    stats = cache.kv_stats()
    stored = {8: 0, 4: 0}
    for block in cache.blocks:
        for layer in range(LAYOUT.num_layers):
            pair = cache.pool.load(block, layer)
            if pair:
                stored[pair[0].bits] += sum(a.nbytes for q in pair for a in (q.codes, q.scale, q.minimum))
    assert stats.bytes_by_tier["L1_int8"] == stored[8] and stats.bytes_by_tier["L2_int4"] == stored[4]
    l0_tokens = stats.tokens_by_tier["L0"] * LAYOUT.num_layers
    assert stats.bytes_by_tier["L0"] == l0_tokens * 2 * LAYOUT.num_kv_heads * LAYOUT.head_size * 4
    assert stats.kv_bytes == sum(stats.bytes_by_tier.values())
    assert stats.fp16_bytes == 400 * LAYOUT.bytes_per_token // 2


def test_context_full_evicts_instead_of_failing_and_plain_cache_refuses():
    small = replace(LAYOUT, max_tokens=256)
    cache = TieredKVCache(small, plan_for_mode("dynamic", recent_window=32))
    fill(cache, 600)
    assert cache.num_tokens <= 256 and len(cache.token_ids) == 600
    refusing = TieredKVCache(small, plan_for_mode("disabled", recent_window=32))
    with pytest.raises(CacheFullError):
        fill(refusing, 300)


def _rope(max_positions: int, dim: int = 64, theta: float = 10000.0) -> RopeTables:
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(max_positions)[:, None] * inv_freq[None]
    return RopeTables(np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))


def test_rotation_by_delta_then_back_restores_keys():
    rope = _rope(512)
    keys = np.random.default_rng(0).normal(size=(2, 10, 64)).astype(np.float32)
    delta = np.arange(-5, 5) * 17
    rotated = keys.copy()
    rope.rotate(rotated, delta)
    rope.rotate(rotated, -delta)
    np.testing.assert_allclose(rotated, keys, atol=1e-5)


def test_positions_are_reindexed_with_rotated_keys_past_the_rope_table():
    rope = _rope(300)
    cache = TieredKVCache(LAYOUT, named_plan("streaming", recent_window=32), rope)
    fill(cache, 250)
    held_positions = cache.buffer.positions[:cache.num_tokens].copy()
    keys_before = cache.buffer.keys[0][0, :, :cache.num_tokens].copy()
    fill(cache, 100)
    assert cache.stats.rebases >= 1
    assert cache.buffer.positions[:cache.num_tokens].max() < 300
    # the rebased keys equal the old keys rotated by their position change
    expected = keys_before.copy()
    rope.rotate(expected, np.arange(len(held_positions)) - held_positions)
    assert np.isfinite(cache.buffer.keys[0]).all() and expected.shape[1] == len(held_positions)


def test_a_chunk_probed_on_its_last_rows_counts_for_each_token_the_rows_that_saw_it():
    cache = TieredKVCache(LAYOUT, replace(named_plan("fp"), importance="attention"))
    fill(cache, 4)
    cache.reserve(6)
    # 6 new tokens (positions 4..9), only the last 2 probed: row 0 at position 8 sees 0..8, row 1 sees 0..9
    rows = np.zeros((1, 1, 2, 10), dtype=np.float32)
    rows[0, 0, 0, :9], rows[0, 0, 1, :] = 1 / 9, 1 / 10
    cache.observe_attention([rows, rows], num_new=6)
    np.testing.assert_array_equal(cache.attention.rows[:10], [4.0] * 9 + [2.0])   # 2 rows x 2 probe layers
    # attention relative to uniform: every row that saw a token gave it exactly its uniform share
    np.testing.assert_allclose(cache.attention.mass[:10] / cache.attention.rows[:10], 1.0)
