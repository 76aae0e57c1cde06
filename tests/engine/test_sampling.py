from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemonade_inferos.engine.sampling import Sampler, SamplingParams
from lemonade_inferos.engine.stopping import StopStringMatcher


def test_greedy_picks_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams(), 4).sample(logits) == 1


def test_repetition_penalty_moves_away_from_seen_tokens():
    logits = np.array([0.0, 3.0, 2.9], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=1.5), 3)
    sampler.observe([1])
    assert sampler.sample(logits) == 2


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0), 4)
    assert {sampler.sample(logits) for _ in range(50)} == {0}


@given(st.lists(st.floats(-20, 20), min_size=2, max_size=64), st.integers(0, 2**31 - 1))
@settings(max_examples=50, deadline=None)
def test_sampled_token_is_always_in_range_and_reproducible(values, seed):
    logits = np.array(values, dtype=np.float32)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=seed)
    a, b = Sampler(params, len(values)).sample(logits), Sampler(params, len(values)).sample(logits)
    assert a == b and 0 <= a < len(values)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_invalid_params_are_rejected_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@given(st.text(max_size=40), st.lists(st.integers(1, 5), max_size=10))
@settings(max_examples=100, deadline=None)
def test_stop_matcher_releases_text_up_to_the_first_stop(text, cuts):
    stop = ("<END>",)
    full = text + "<END>" + "tail"
    matcher = StopStringMatcher(stop)
    out, pos = "", 0
    for size in cuts + [len(full)]:
        if matcher.stopped:
            break
        out += matcher.feed(full[pos:pos + size])
        pos += size
    assert matcher.stopped
    assert out == full[:full.index("<END>")]


def test_stop_matcher_flushes_a_held_partial_match():
    matcher = StopStringMatcher(("###",))
    assert matcher.feed("abc#") == "abc"
    assert matcher.flush() == "#"
