"""Speculative decoding on the real model: same greedy tokens as plain decoding, a cache that never saw a
rejected token, the acceptance watch, and the sampling rule's distribution."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.corpus import corpus_text
from lemonade_inferos.engine.sampling import Sampler, SamplingParams
from lemonade_inferos.engine.speculative import NgramDrafter, SpeculationConfig
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import named_plan
from lemonade_inferos.kvcache.prefix_store import PrefixStore

NGRAM = SpeculationConfig(mode="ngram", min_accept_rate=0.0)


@pytest.fixture(scope="module")
def repeat_prompt(ort_engine) -> list[int]:
    """A prompt the model answers by quoting it: drafts are accepted often, and rejected now and then."""
    passage = corpus_text()[5000:6400]
    messages = [{"role": "user", "content": passage + "\n\nRepeat the text above word for word."}]
    return ort_engine.tokenizer.encode(ort_engine.tokenizer.apply_chat_template(messages))


def _run(engine, prompt, cache=None, speculation=None, max_tokens=96, **params):
    stats, tokens = GenerationStats(), []
    for chunk in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, **params), stats=stats, cache=cache,
                                 speculation=speculation):
        tokens.extend(chunk.token_ids)
    return tokens, stats


def test_the_drafter_proposes_what_followed_the_latest_earlier_occurrence():
    drafter = NgramDrafter(2, 3)
    drafter.extend([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2])
    assert drafter.propose(3) == [3, 7, 8]  # "1 2" last seen before the suffix at index 6
    drafter.extend([3])
    assert drafter.propose(2) == [7, 8]     # "1 2 3" (the longest n-gram that matches wins)
    assert NgramDrafter(2, 3).propose(4) == []
    lonely = NgramDrafter(2, 2)
    lonely.extend([5, 6])
    assert lonely.propose(4) == []          # the suffix itself is never its own match


def test_greedy_tokens_are_identical_to_plain_decoding_and_drafts_are_accepted(ort_engine, repeat_prompt):
    plain, _ = _run(ort_engine, repeat_prompt)
    drafted, stats = _run(ort_engine, repeat_prompt, speculation=NGRAM)
    assert drafted == plain
    assert stats.drafted_n > 20 and 0 < stats.accepted_n < stats.drafted_n  # some kept, some rolled back


def _tiered(engine, window=32):
    return TieredKVCache(engine.layout, named_plan("int8", recent_window=window))


def _assert_same_cache(a: TieredKVCache, b: TieredKVCache) -> None:
    assert a.token_ids == b.token_ids and a.num_tokens == b.num_tokens
    n = a.num_tokens
    np.testing.assert_array_equal(a.buffer.positions[:n], b.buffer.positions[:n])
    assert [(x.start, x.tiers.tolist()) for x in a.blocks] == [(x.start, x.tiers.tolist()) for x in b.blocks]
    window = n - a._sealed_end  # full precision: only the multi-row forward's rounding may differ (<= 3e-3 seen
    # in the last layer after 30 layers of differently ordered sums)
    for layer in (0, len(a.buffer.keys) - 1):
        for buffers_a, buffers_b in ((a.buffer.keys, b.buffer.keys), (a.buffer.values, b.buffer.values)):
            np.testing.assert_allclose(buffers_a[layer][0, :, n - window:n], buffers_b[layer][0, :, n - window:n],
                                       atol=1e-2)
            # quantized history: that rounding may move a value across one INT8 step
            np.testing.assert_allclose(buffers_a[layer][0, :, :n], buffers_b[layer][0, :, :n], atol=0.05)
        for x, y in zip(a.blocks, b.blocks):
            assert (a.pool.load(x, layer) is None) == (b.pool.load(y, layer) is None)


def test_the_tiered_cache_never_keeps_a_rejected_token_across_block_boundaries(ort_engine, repeat_prompt):
    plain_cache, spec_cache = _tiered(ort_engine), _tiered(ort_engine)
    plain, _ = _run(ort_engine, repeat_prompt, plain_cache, max_tokens=120)
    drafted, stats = _run(ort_engine, repeat_prompt, spec_cache, NGRAM, max_tokens=120)
    assert drafted == plain and stats.drafted_n > stats.accepted_n > 0
    assert len(spec_cache.blocks) > 10  # blocks were sealed and quantized while drafts came and went
    _assert_same_cache(spec_cache, plain_cache)


def test_speculation_on_a_prompt_restored_from_the_prefix_store(ort_engine, repeat_prompt):
    store = PrefixStore(2**30)
    first = _tiered(ort_engine)
    _run(ort_engine, repeat_prompt, first, max_tokens=8)
    store.park(first, b"salt")
    caches = []
    for speculation in (None, NGRAM):
        cache = _tiered(ort_engine)
        assert store.restore(cache, store.lookup(repeat_prompt, b"salt")) >= 32 * 10
        caches.append((cache, _run(ort_engine, repeat_prompt, cache, speculation)[0]))
    (plain_cache, plain), (spec_cache, drafted) = caches
    assert drafted == plain
    _assert_same_cache(spec_cache, plain_cache)


def test_attention_probe_scores_count_accepted_tokens_only(model_dir, repeat_prompt):
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    engine = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], attention_probe=True))
    plan = replace(named_plan("dynamic", recent_window=32), importance="attention")
    caches = [TieredKVCache(engine.layout, plan) for _ in range(2)]
    plain, _ = _run(engine, repeat_prompt, caches[0], max_tokens=80)
    drafted, stats = _run(engine, repeat_prompt, caches[1], NGRAM, max_tokens=80)
    assert drafted == plain and stats.drafted_n > stats.accepted_n
    n = caches[0].num_tokens
    # exactly the (layer, head, query) rows plain decoding observed: no rejected query row was counted
    np.testing.assert_array_equal(caches[1].attention.rows[:n], caches[0].attention.rows[:n])
    # the probabilities themselves come from multi-row forwards, which round differently
    np.testing.assert_allclose(caches[1].attention.mass[:n], caches[0].attention.mass[:n], rtol=0.03)
    np.testing.assert_allclose([b.scores for b in caches[1].blocks], [b.scores for b in caches[0].blocks], rtol=0.03)


def test_min_accept_rate_stops_drafting_where_it_does_not_pay(ort_engine, repeat_prompt):
    _, eager = _run(ort_engine, repeat_prompt, speculation=NGRAM, max_tokens=128)
    _, watched = _run(ort_engine, repeat_prompt, speculation=SpeculationConfig(mode="auto", min_accept_rate=0.95),
                      max_tokens=128)
    assert eager.drafted_n > 64 and eager.accepted_n / eager.drafted_n < 0.95
    assert 32 <= watched.drafted_n < eager.drafted_n / 2  # judged after 32 drafted tokens, then stopped


def test_the_sampling_rule_leaves_the_distribution_unchanged():
    logits = np.array([2.0, 1.5, 0.3, -1.0, 0.9], dtype=np.float32)
    params = SamplingParams(temperature=0.8, seed=7)
    expected = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    trials = 40_000
    for draft in (0, 3):  # a likely and an unlikely draft token
        sampler = Sampler(params, vocab_size=5)
        counts, kept = np.zeros(5), 0
        for _ in range(trials):
            token, accepted = sampler.verify(logits, draft)
            counts[token] += 1
            kept += accepted
        assert np.abs(counts / trials - expected).max() < 0.01
        assert abs(kept / trials - expected[draft]) < 0.01  # the draft is kept with probability p(draft)


def test_a_bad_speculation_config_is_refused():
    for bad in ({"mode": "sometimes"}, {"num_draft_tokens": -1}, {"ngram_min": 4, "ngram_max": 2}):
        with pytest.raises(ValueError):
            SpeculationConfig(**bad)


def test_a_draft_model_drafts_in_its_own_cache_and_changes_no_greedy_token(ort_engine, model_dir, repeat_prompt):
    """The model drafting for itself (a second session of it): the draft cache follows every rollback."""
    plain, _ = _run(ort_engine, repeat_prompt)
    drafted, stats = _run(ort_engine, repeat_prompt,
                          speculation=SpeculationConfig(mode="draft", draft_model=str(model_dir), min_accept_rate=0))
    assert drafted == plain
    assert stats.drafted_n > 40 and stats.accepted_n / stats.drafted_n > 0.8


def test_a_draft_model_with_another_tokenizer_is_refused_clearly(ort_engine, model_dir, tmp_path):
    import json
    import os

    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for path in model_dir.iterdir():
        if path.name != "tokenizer.json":
            os.symlink(path, other / path.name)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="different tokenizer"):
        ort_engine.draft_engine(str(other))
    # a request asking for it decodes plainly instead of failing
    tokens, stats = _run(ort_engine, [1, 2, 3], speculation=SpeculationConfig(mode="draft", draft_model=str(other)),
                         max_tokens=4)
    assert len(tokens) <= 4 and stats.drafted_n == 0
