from __future__ import annotations

import pytest
from pydantic import ValidationError

from lemonade_inferos.config.policy import GIB, Policy
from lemonade_inferos.config.sizes import parse_size


@pytest.mark.parametrize("text,expected", [
    ("2048MiB", 2048 * 2**20), ("4GiB", 4 * 2**30), ("1.5GB", 1_500_000_000), ("512KB", 512_000),
    ("100B", 100), ("1kib", 1024), (4294967296, 4294967296), ("2 GiB", 2 * 2**30),
])
def test_size_parsing_table(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4 gigs", "GiB", "-1GB", "1.5.5GB", True, None, [1]])
def test_bad_sizes_say_which_units_exist(bad):
    with pytest.raises(ValueError, match="GiB"):
        parse_size(bad)


def test_defaults_are_the_design_documents():
    policy = Policy()
    assert policy.kv.mode == "dynamic" and policy.kv.recent_window == 64
    assert (policy.kv.level_thresholds.L1_int8, policy.kv.level_thresholds.L2_int4,
            policy.kv.level_thresholds.L3_evict) == (0.7, 0.5, 0.3)
    assert policy.io.dml_pool_bytes == 2 * GIB and policy.io.host_pool_bytes == 4 * GIB
    assert policy.quality.max_delta_ppl == 0.5 and policy.quality.min_accept_rate == 0.5
    assert (policy.scheduler.mode, policy.scheduler.prefill_device, policy.scheduler.decode_device) == \
        ("hybrid", "dml", "npu")


@pytest.mark.parametrize("update", [
    {"kv": {"recent_window": 15}}, {"kv": {"recent_window": 513}}, {"kv": {"mode": "fastest"}},
    {"kv": {"level_thresholds": {"L1_int8": 1.1}}}, {"io": {"dml_pool_bytes": "512MiB"}},
    {"io": {"host_pool_bytes": 1000}}, {"quality": {"max_delta_ppl": 2.5}}, {"scheduler": {"mode": "cpu"}},
    {"kv": {"unknown_field": 1}},
])
def test_out_of_range_updates_are_rejected(update):
    with pytest.raises(ValidationError):
        Policy().merged(update)


def test_partial_update_merges_and_keeps_the_rest():
    policy = Policy().merged({"kv": {"level_thresholds": {"L2_int4": 0.4}}, "io": {"host_pool_bytes": "8GiB"}})
    assert policy.kv.level_thresholds.L2_int4 == 0.4 and policy.kv.level_thresholds.L1_int8 == 0.7
    assert policy.io.host_pool_bytes == 8 * GIB and policy.kv.recent_window == 64


def test_bounds_are_inclusive():
    assert Policy().merged({"kv": {"recent_window": 16}}).kv.recent_window == 16
    assert Policy().merged({"kv": {"recent_window": 512}}).kv.recent_window == 512
    assert Policy().merged({"io": {"dml_pool_bytes": GIB}}).io.dml_pool_bytes == GIB
