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


def test_frequency_penalty_subtracts_per_occurrence_and_presence_once():
    logits = np.array([0.0, 3.0, 2.0, 1.9], dtype=np.float32)
    frequency = Sampler(SamplingParams(frequency_penalty=0.6), 4)
    frequency.observe([1, 1, 2])            # token 1 twice: 3.0 - 1.2 = 1.8; token 2 once: 2.0 - 0.6 = 1.4
    assert frequency.sample(logits) == 3    # 3 unseen at 1.9 beats 1.8 and 1.4
    presence = Sampler(SamplingParams(presence_penalty=0.6), 4)
    presence.observe([1, 1, 2])             # once each: 2.4 and 1.4, so token 1 stays first
    assert presence.sample(logits) == 1


def test_repeat_last_n_bounds_the_penalties_to_the_latest_tokens_and_zero_turns_them_off():
    logits = np.array([0.0, 3.0, 2.9], dtype=np.float32)
    old = Sampler(SamplingParams(repetition_penalty=1.5, repeat_last_n=2), 3)
    old.observe([1, 0, 0])                  # token 1 is outside the last two
    assert old.sample(logits) == 1
    off = Sampler(SamplingParams(repetition_penalty=1.5, presence_penalty=2.0, repeat_last_n=0), 3)
    off.observe([1])
    assert off.sample(logits) == 1 and not SamplingParams(repetition_penalty=1.5, repeat_last_n=0).penalizes


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


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0),
                                 dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(repeat_last_n=-2)])
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
