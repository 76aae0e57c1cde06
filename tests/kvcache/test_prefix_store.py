"""The prefix store on synthetic K/V: hash chains, LRU, spill to disk and back, restarts, guard drops."""

from __future__ import annotations

import numpy as np

from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT8, TIER_L0, named_plan
from lemonade_inferos.kvcache.prefix_store import PrefixStore, block_hashes

from .test_manager import LAYOUT, fill

SALT = PrefixStore.salt("model", "format")


def _sequence(num_tokens: int, seed: int = 0) -> TieredKVCache:
    cache = TieredKVCache(LAYOUT, named_plan("int8", recent_window=32))
    fill(cache, num_tokens, seed=seed)
    return cache


def test_hash_chain_depends_on_every_earlier_token():
    a = block_hashes(list(range(96)), 32, SALT)
    b = block_hashes([999] + list(range(1, 96)), 32, SALT)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))
    assert block_hashes(list(range(64)), 32, SALT) == a[:2]
    assert block_hashes(list(range(96)), 32, PrefixStore.salt("other model", "format")) != a


def test_restored_prefix_holds_the_parked_values():
    cache = _sequence(200)
    store = PrefixStore(2**30)
    assert store.park(cache, SALT) == 6
    found = store.lookup(cache.token_ids + [1, 2, 3], SALT)
    assert len(found) == 6
    restored = TieredKVCache(LAYOUT, named_plan("int8", recent_window=32))
    assert store.restore(restored, found) == 192
    assert restored.token_ids == cache.token_ids[:192]
    np.testing.assert_allclose(restored.buffer.keys[1][0, :, :192], cache.buffer.keys[1][0, :, :192], atol=0.05)
    assert restored.kv_stats().bytes_by_tier["L1_int8"] > 0  # restored blocks are accounted at their tier


def test_a_prompt_always_leaves_one_token_to_run():
    cache = _sequence(64)
    store = PrefixStore(2**30)
    store.park(cache, SALT)
    assert len(store.lookup(cache.token_ids, SALT)) == 1  # 64 tokens: only the first block may be reused


def test_lru_budget_drops_tails_before_shared_prefixes():
    store = PrefixStore(2**30)
    shared = _sequence(128, seed=1)
    store.park(shared, SALT)
    per_block = store.nbytes // 4
    store.set_budget(per_block * 4)
    other = _sequence(128, seed=1)
    other.token_ids[:] = other.token_ids[:64] + [7] * 64  # same first two blocks, different tail
    store.park(other, SALT)
    # the shared first blocks were stamped most recently, the old tail went first
    assert len(store.lookup(shared.token_ids + [0], SALT)) == 2
    assert len(store.lookup(other.token_ids + [0], SALT)) == 4


def test_blocks_spilled_to_disk_come_back_and_survive_a_restart(tmp_path):
    cache = _sequence(200)
    store = PrefixStore(1, spill_dir=tmp_path, spill_budget_bytes=2**30)  # memory budget of one byte
    store.park(cache, SALT)
    assert store.nbytes <= 1 and store.spill.stats()["files"] == 6
    assert len(store.lookup(cache.token_ids + [5], SALT)) == 6
    restarted = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    found = restarted.lookup(cache.token_ids + [5], SALT)
    assert len(found) == 6 and restarted.pool.load(found[0])[0].bits == 8


def test_flush_writes_memory_blocks_for_the_next_start(tmp_path):
    store = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    store.park(_sequence(200), SALT)
    assert store.flush() == 6 and len(list(tmp_path.glob("*.npz"))) == 6


def test_guard_drop_removes_blocks_beyond_the_cap():
    store = PrefixStore(2**30)
    cache = TieredKVCache(LAYOUT, named_plan("int4", recent_window=32))
    fill(cache, 200)
    store.park(cache, SALT)
    assert store.drop_above(TIER_INT8) > 0
    assert all(b.tier <= TIER_INT8 for b in store.pool.cached_blocks())


def _exact_sequence(num_tokens: int, seed: int = 0) -> TieredKVCache:
    cache = TieredKVCache(LAYOUT, named_plan("disabled"))
    fill(cache, num_tokens, seed=seed)
    return cache


def test_a_cache_that_may_not_quantize_parks_and_restores_exact_blocks(tmp_path):
    cache = _exact_sequence(200)
    store = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    assert store.park(cache, SALT) == 6
    assert {b.tier for b in store.pool.cached_blocks()} == {TIER_L0}
    store.flush()
    restarted = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)  # through the disk as well
    for source in (store, restarted):
        restored = TieredKVCache(LAYOUT, named_plan("disabled"))
        assert source.restore(restored, source.lookup(cache.token_ids + [1], SALT, TIER_L0)) == 192
        np.testing.assert_array_equal(restored.buffer.keys[1][0, :, :192], cache.buffer.keys[1][0, :, :192])
        np.testing.assert_array_equal(restored.buffer.values[0][0, :, :192], cache.buffer.values[0][0, :, :192])
        assert restored.kv_stats().bytes_by_tier["L1_int8"] == 0


def test_the_guards_cap_also_holds_for_parking_and_lookups():
    quantized, store = _sequence(200), PrefixStore(2**30)
    store.park(quantized, SALT)
    assert store.lookup(quantized.token_ids + [1], SALT, TIER_L0) == []  # exact only: INT8 blocks are not used
    capped = TieredKVCache(LAYOUT, named_plan("int8", recent_window=32))
    capped.max_tier = TIER_L0
    fill(capped, 200, seed=3)
    store.park(capped, SALT)
    assert len(store.lookup(capped.token_ids + [1], SALT, TIER_L0)) == 6


def test_an_exact_block_replaces_a_quantized_copy_on_disk_too(tmp_path):
    store = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    quantized = _sequence(200)
    store.park(quantized, SALT)
    store.flush()
    exact = _exact_sequence(200)  # the same token ids, a cache that may not quantize
    assert store.park(exact, SALT) == 6
    store.flush()
    restarted = PrefixStore(2**30, spill_dir=tmp_path, spill_budget_bytes=2**30)
    found = restarted.lookup(exact.token_ids + [1], SALT, TIER_L0)
    assert len(found) == 6 and all(b.tier == TIER_L0 for b in found)
    assert restarted.spill.stats()["files"] == 6


def _spilled_store(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROS_HOME", str(tmp_path / "home"))
    store = PrefixStore(1, spill_dir=tmp_path / "spill", spill_budget_bytes=2**30)  # everything goes to disk
    cache = _sequence(6 * 32 + 5)
    store.park(cache, SALT)
    return store, cache


def test_a_truncated_spill_file_is_quarantined_and_counts_as_a_miss(tmp_path, monkeypatch):
    store, cache = _spilled_store(tmp_path, monkeypatch)
    files = sorted((tmp_path / "spill").glob("*.npz"))
    hashes = block_hashes(cache.token_ids, 32, SALT)
    damaged = tmp_path / "spill" / f"{hashes[2].hex()}.npz"
    with damaged.open("r+b") as fh:  # what `truncate -s 200000` does to a block file
        fh.truncate(damaged.stat().st_size // 2)
    restarted = PrefixStore(2**30, spill_dir=tmp_path / "spill", spill_budget_bytes=2**30)
    found = restarted.lookup(cache.token_ids + [1], SALT)
    assert len(found) == 2  # the prefix ends before the damaged block
    assert not damaged.exists() and len(files) == 6
    assert [p.name.endswith(damaged.name) for p in (tmp_path / "home" / "quarantine").iterdir()] == [True]
    assert restarted.spill.stats()["corrupt_files"] == 1
    assert len(restarted.lookup(cache.token_ids + [1], SALT)) == 2  # asked again: a plain miss, no error


def test_a_flipped_byte_fails_the_checksum(tmp_path, monkeypatch):
    store, cache = _spilled_store(tmp_path, monkeypatch)
    first = tmp_path / "spill" / f"{block_hashes(cache.token_ids, 32, SALT)[0].hex()}.npz"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored codes: the zip is still readable
    first.write_bytes(bytes(data))
    restarted = PrefixStore(2**30, spill_dir=tmp_path / "spill", spill_budget_bytes=2**30)
    assert restarted.lookup(cache.token_ids + [1], SALT) == []
    assert restarted.spill.stats()["corrupt_files"] == 1 and not first.exists()


def test_a_block_file_renamed_to_another_hash_is_refused(tmp_path, monkeypatch):
    store, cache = _spilled_store(tmp_path, monkeypatch)
    hashes = block_hashes(cache.token_ids, 32, SALT)
    first, second = (tmp_path / "spill" / f"{h.hex()}.npz" for h in hashes[:2])
    second.write_bytes(first.read_bytes())  # valid file, wrong name: would restore the wrong tokens' KV
    restarted = PrefixStore(2**30, spill_dir=tmp_path / "spill", spill_budget_bytes=2**30)
    assert len(restarted.lookup(cache.token_ids + [1], SALT)) == 1


def test_leftover_and_foreign_files_in_the_spill_folder_do_not_stop_a_start(tmp_path, monkeypatch):
    store, cache = _spilled_store(tmp_path, monkeypatch)
    spill = tmp_path / "spill"
    name = next(spill.glob("*.npz")).name
    (spill / f"{name[:-4]}.tmp.npz").write_bytes(b"half a block")  # the old writer's temporary name
    (spill / f".{name}.inferos-tmp-x1y2").write_bytes(b"half a block")
    (spill / "notes.txt").write_text("not ours")
    restarted = PrefixStore(2**30, spill_dir=spill, spill_budget_bytes=2**30)
    assert restarted.spill.stats()["files"] == 6
    assert sorted(p.name for p in spill.iterdir() if not p.name.endswith(".npz") or ".tmp" in p.name) == []
    assert len(list((tmp_path / "home" / "quarantine").iterdir())) == 3
    assert len(restarted.lookup(cache.token_ids + [1], SALT)) == 6


def test_discarded_blocks_are_gone_from_memory_and_disk(tmp_path, monkeypatch):
    store, cache = _spilled_store(tmp_path, monkeypatch)
    found = store.lookup(cache.token_ids + [1], SALT)
    store.discard(found[1:3])
    assert len(store.lookup(cache.token_ids + [1], SALT)) == 1
    assert len(list((tmp_path / "spill").glob("*.npz"))) == 4
