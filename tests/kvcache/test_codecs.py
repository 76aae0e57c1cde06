from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lemonade_inferos.kvcache.codecs import AsymmetricCodec, get_codec, pack_int4, unpack_int4

finite = st.floats(-50, 50, allow_nan=False, width=32)


@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 8), st.sampled_from([2, 8, 64])),
              elements=st.integers(0, 15)))
def test_int4_pack_round_trip(codes):
    packed = pack_int4(codes)
    assert packed.shape[-1] == codes.shape[-1] // 2 and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
@settings(max_examples=40, deadline=None)
@given(data=arrays(np.float32, (3, 32, 64), elements=finite))
def test_dequantized_error_is_within_half_a_step(bits, axis, data):
    codec = AsymmetricCodec(bits, 32)
    q = codec.quantize(data, axis)
    restored = codec.dequantize(q)
    grouped_err = np.abs(codec._grouped(restored - data, axis))
    step = q.scale.astype(np.float32)
    # half a step, plus the fp16 rounding of the stored minimum
    bound = step / 2 + np.abs(q.minimum.astype(np.float32)) * 2**-10 + 1e-6
    assert (grouped_err <= bound * 1.001 + 1e-5).all()


@pytest.mark.parametrize("bits,axis", [(8, "token"), (8, "channel"), (4, "token"), (4, "channel")])
def test_nbytes_is_exactly_what_is_stored(bits, axis):
    codec = AsymmetricCodec(bits, 32)
    q = codec.quantize(np.random.default_rng(0).normal(size=(3, 32, 64)).astype(np.float32), axis)
    assert q.nbytes == codec.nbytes(3, 32, 64, axis)
    assert q.codes.nbytes == 3 * 32 * 64 * bits // 8


def test_int4_error_is_larger_than_int8():
    x = np.random.default_rng(1).normal(size=(3, 32, 64)).astype(np.float32)
    errors = {bits: np.abs(AsymmetricCodec(bits).dequantize(AsymmetricCodec(bits).quantize(x, "channel")) - x).mean()
              for bits in (8, 4)}
    assert errors[8] < errors[4] / 8


def test_constant_group_round_trips_exactly():
    x = np.full((1, 32, 64), 0.25, dtype=np.float32)
    codec = AsymmetricCodec(4)
    np.testing.assert_array_equal(codec.dequantize(codec.quantize(x, "token")), x)


@pytest.mark.parametrize("kwargs,match", [(dict(bits=3), r"\(4, 8\)"), (dict(bits=8, group_size=20), "group_size")])
def test_invalid_codec_settings_name_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricCodec(**kwargs)


def test_unknown_codec_lists_the_choices():
    with pytest.raises(ValueError, match="int4"):
        get_codec("int2")
