"""The tiered cache on the INT8 live form: sealing, INT4 demotion, eviction, re-indexing, parking and restoring."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0, make_plan
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.kvcache.warm import WarmCaches

SALT = PrefixStore.salt("model", "int8-live-test")


@pytest.fixture(scope="module")
def engine(model_dir):
    return OrtEngine(model_dir, SessionPolicy(devices=["cpu"], kv_cache="int8"))


@pytest.fixture(scope="module")
def rope(engine):
    return RopeTables.from_onnx(engine.folder.onnx_path)


def _cache(engine, rope, name, **changes):
    plan = replace(make_plan(name, 64, 0.0, "key_norm"), **changes)
    return TieredKVCache(engine.layout_for(plan), plan, rope)


def test_held_tokens_are_int8_and_sealed_blocks_start_at_l1(engine, rope, corpus_ids):
    cache = _cache(engine, rope, "live8:dynamic")
    engine.forward(corpus_ids[:400], cache)
    stats = cache.kv_stats()
    assert cache.layout.live_int8 and cache.buffer.keys[0].dtype == np.int8
    assert cache.blocks and all((b.tiers == TIER_INT8).all() for b in cache.blocks)
    assert stats.bytes_by_tier["L0"] == 0 and stats.tokens_by_tier["L1_int8"] == 400
    assert stats.working_buffer_used_bytes == 400 * engine.full_precision_layout.bytes_per_token // 4
    assert stats.live_form == "int8" and cache.pool.nbytes == 0   # INT8 blocks live in the buffer only


def test_int4_demotion_rounds_values_and_keeps_codes_in_the_pool(engine, rope, corpus_ids):
    cache = _cache(engine, rope, "live8:int4")
    engine.forward(corpus_ids[:400], cache)
    demoted = [b for b in cache.blocks if (b.tiers == TIER_INT4).all()]
    assert demoted and cache.pool.nbytes_by_bits()[4] > 0
    block = demoted[0]
    keys_in_buffer = cache.buffer.read(3, 0, block.start, block.end)
    stored_keys, _ = cache.pool.load(block, 3)
    restored = cache._codecs[TIER_INT4].dequantize(stored_keys)
    # what the model reads is the INT4 value, quantized to the INT8 grid: within half an INT8 step of it
    step = cache.layout.scales.keys[3]
    assert np.all(np.abs(keys_in_buffer - restored) <= step / 2 + 1e-6)


def test_eviction_and_reindexing_past_the_rope_table_work_on_int8(engine, rope, corpus_ids):
    small = replace(engine.layout_for(make_plan("live8:dynamic", 32, 0.0)), max_tokens=256)
    short_rope = RopeTables(rope.cos[:320], rope.sin[:320])
    plan = replace(make_plan("live8:dynamic", 32, 0.0, "key_norm"), recent_window=32)
    cache = TieredKVCache(small, plan, short_rope)
    stats = GenerationStats()
    chunks = list(engine.generate(corpus_ids[:200], SamplingParams(max_tokens=400, ignore_eos=True),
                                  stats=stats, cache=cache))
    assert stats.predicted_n == 400 and cache.stats.blocks_evicted > 0 and cache.stats.rebases > 0
    assert len(set("".join(c.text for c in chunks).split())) > 20


def test_reindexing_rotates_dequantized_keys_and_requantizes_them(engine, rope, corpus_ids):
    cache = _cache(engine, rope, "live8:fp")
    engine.forward(corpus_ids[:128], cache)
    before = [cache.buffer.read(layer, 0, 0, 128).copy() for layer in range(cache.layout.num_layers)]
    cache.buffer.positions[:128] += 100                  # pretend they sat 100 positions later
    cache._rebase_positions()
    for layer in (0, 15):
        expected = before[layer].copy()
        rope.rotate(expected, np.full(128, -100))
        step = np.broadcast_to(cache.layout.scales.keys[layer], expected.shape)
        inside = np.abs(expected) < 127 * step   # values beyond the calibrated range saturate (documented)
        assert inside.mean() > 0.999
        assert np.all((np.abs(cache.buffer.read(layer, 0, 0, 128) - expected) <= step / 2 + 1e-5)[inside])


def test_parked_int8_blocks_are_the_codes_and_restore_bit_exactly(engine, rope, corpus_ids):
    cache = _cache(engine, rope, "live8:dynamic")
    engine.forward(corpus_ids[:300], cache)
    store = PrefixStore(2**30)
    assert store.park(cache, SALT) == 300 // 32
    blocks = store.lookup(corpus_ids[:301], SALT)
    keys, values = store.pool.load(blocks[2])
    assert keys.dtype == np.int8 and blocks[2].tier == TIER_INT8     # no second quantization
    np.testing.assert_array_equal(keys, cache.buffer.stacked(64, 96, codes=True)[0])
    restored = _cache(engine, rope, "live8:dynamic")
    assert store.restore(restored, blocks) == 288
    for layer in (0, 29):
        np.testing.assert_array_equal(restored.buffer.keys[layer][0, :, :288], cache.buffer.keys[layer][0, :, :288])
        np.testing.assert_array_equal(restored.buffer.values[layer][0, :, :288],
                                      cache.buffer.values[layer][0, :, :288])
    logits_a = engine.forward(corpus_ids[288:300], restored)
    cache.truncate(288)
    np.testing.assert_array_equal(logits_a, engine.forward(corpus_ids[288:300], cache))


def test_int8_codes_survive_the_disk_spill(engine, rope, corpus_ids, tmp_path):
    cache = _cache(engine, rope, "live8:dynamic")
    engine.forward(corpus_ids[:130], cache)
    store = PrefixStore(1, spill_dir=tmp_path, spill_budget_bytes=2**30)   # nothing fits in memory: all spill
    store.park(cache, SALT)
    fresh = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    blocks = fresh.lookup(corpus_ids[:131], SALT)
    assert len(blocks) == 4
    keys, _ = fresh.pool.load(blocks[3])
    np.testing.assert_array_equal(keys, cache.buffer.stacked(96, 128, codes=True)[0])


def test_a_warm_int8_cache_is_a_quarter_of_a_float_one(engine, rope, corpus_ids):
    live = _cache(engine, rope, "live8:dynamic")
    full = _cache(engine, rope, "dynamic")
    for cache in (live, full):
        cache.plan_capacity(512)
        engine.forward(corpus_ids[:300], cache)
    assert live.nbytes * 4 <= full.nbytes * 1.01
    warm = WarmCaches(capacity=1, max_bytes=live.nbytes)
    warm.put(live, SALT)
    taken, common = warm.take(corpus_ids[:310], SALT, live.layout, TIER_INT4)
    assert taken is live and common == 300


def test_the_guards_last_steps_and_disabled_mode_run_on_the_float_graph(engine):
    controller = Controller()
    assert controller.kv_plan().live_kv == "int8"
    for level, live in ((1, "int8"), (2, "model"), (3, "model")):
        controller.guard.level = level
        plan = controller.kv_plan()
        assert plan.live_kv == live
        assert engine.layout_for(plan).live_int8 == (live == "int8")
    controller.guard.level = 0
    controller.update_policy({"kv": {"mode": "disabled"}})
    assert controller.kv_plan().live_kv == "model"
    controller.update_policy({"kv": {"mode": "dynamic", "live_format": "model"}})
    assert controller.kv_plan().live_kv == "model"


def test_an_int8_cache_never_reuses_blocks_parked_from_a_float_cache(engine, rope, corpus_ids):
    from lemonade_inferos.plugin import InferosPlugin

    full = _cache(engine, rope, "dynamic")
    live = _cache(engine, rope, "live8:dynamic")
    assert InferosPlugin._kv_format(full.layout, full.plan) != InferosPlugin._kv_format(live.layout, live.plan)
    assert live.floor_tier == TIER_INT8 and full.floor_tier == TIER_L0


def test_speculative_decoding_on_int8_keeps_every_greedy_token(engine, rope, corpus_ids):
    """Rejected drafts' K/V lie past the cache's length in the INT8 buffer too: nothing to roll back."""
    from lemonade_inferos.engine.speculative import SpeculationConfig

    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = corpus_ids[:300]
    plain = [t for c in engine.generate(prompt, params, cache=_cache(engine, rope, "live8:dynamic"))
             for t in c.token_ids]
    stats = GenerationStats()
    spec = [t for c in engine.generate(prompt, params, stats=stats, cache=_cache(engine, rope, "live8:dynamic"),
                                       speculation=SpeculationConfig(mode="ngram")) for t in c.token_ids]
    assert spec == plain and stats.drafted_n > 0
