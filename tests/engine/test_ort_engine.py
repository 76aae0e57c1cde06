"""Our engine against og.Generator on the real model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.engine.kv import DenseKVCache
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.errors import GenerationError
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import named_plan


def _tokens(engine, prompt, cache=None, **params):
    params.setdefault("max_tokens", 48)
    return [t for c in engine.generate(prompt, SamplingParams(**params), cache=cache) for t in c.token_ids]


def _chat(engine, text):
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_greedy_tokens_match_og_generator_on_a_chat_prompt(ort_engine, og_engine):
    prompt = _chat(ort_engine, "Explain in two sentences why the sky is blue.")
    ours = _tokens(ort_engine, prompt, ignore_eos=True)
    theirs = _tokens(og_engine, prompt, ignore_eos=True)
    assert ours == theirs and len(ours) == 48


def test_greedy_tokens_match_og_generator_on_a_long_prompt_with_chunked_prefill(model_dir, og_engine, corpus_ids):
    chunked = OrtEngine(model_dir, prefill_chunk_tokens=96)
    prompt = corpus_ids[:700]
    assert _tokens(chunked, prompt, ignore_eos=True) == _tokens(og_engine, prompt, ignore_eos=True)


def test_a_long_chunk_is_probed_on_its_last_rows_only_so_the_probabilities_stay_bounded(ort_engine):
    from lemonade_inferos.engine import ort_engine as module
    from lemonade_inferos.engine.ort_engine import MIN_PROBE_ROWS, PROBE_SCRATCH_BYTES

    heads, full = ort_engine.folder.num_attention_heads, 256   # a probing engine's chunk
    assert ort_engine.probe_rows(0, full) == full   # short contexts: the whole chunk
    assert ort_engine.probe_rows(2048, full, module.SPLIT_PROBE_BYTES) == full   # a pass of their own: later
    for cached in (2048, 4096, 6900):
        rows = ort_engine.probe_rows(cached, full)
        assert MIN_PROBE_ROWS <= rows < full
        assert 4 * heads * rows * (cached + full) <= PROBE_SCRATCH_BYTES
    assert ort_engine.probe_rows(10**6, full) == MIN_PROBE_ROWS
    assert ort_engine.probe_rows(10**6, 5) == 5


def test_a_long_prompt_probed_on_a_few_rows_per_chunk_decodes_as_in_one_chunk(model_dir, corpus_ids, monkeypatch):
    from lemonade_inferos.engine import ort_engine as module

    prompt = corpus_ids[:600]
    reference = _tokens(OrtEngine(model_dir, prefill_chunk_tokens=600), prompt, ignore_eos=True)
    # the float form's graph: the probed rows run on their own past this budget (120 rows of a chunk, then fewer)
    monkeypatch.setattr(module, "SPLIT_PROBE_BYTES", 4 * 9 * 40 * 600)
    engine = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], attention_probe=True), prefill_chunk_tokens=200)
    assert engine.form_for(engine.layout).graph.probe_switch
    cache = TieredKVCache(engine.layout, replace(named_plan("fp"), importance="attention"))
    observed = []
    original = cache.observe_attention
    cache.observe_attention = lambda probes, num_new: (observed.append(probes[0].shape), original(probes, num_new))
    assert _tokens(engine, prompt, ignore_eos=True, cache=cache) == reference
    # each 200-token chunk: its first rows unprobed, its last rows probed; then one row per decode step
    assert [shape[2] for shape in observed[:3]] == [24000 // 200, 24000 // 400, 24000 // 600]
    assert all(shape[2] == 1 for shape in observed[3:]) and len(observed) == 3 + 47
    assert cache.attention.rows[:600].min() > 0   # every prompt token was seen by some probed row


def test_chunked_prefill_gives_the_same_logits_as_one_pass(ort_engine, corpus_ids):
    ids = corpus_ids[:300]
    whole = ort_engine.forward(ids, ort_engine.new_cache())
    cache = ort_engine.new_cache()
    parts = np.concatenate([ort_engine.forward(ids[i:i + 64], cache) for i in range(0, 300, 64)])
    np.testing.assert_allclose(parts, whole, atol=2e-3)


def test_prefill_computes_only_the_last_logits_row_and_it_equals_the_full_pass(ort_engine, corpus_ids):
    from lemonade_inferos.engine.binding import StepBinding

    assert ort_engine.has_logits_positions, "the LM head of the built model was not found by the graph patch"
    chunk = np.asarray(corpus_ids[:200], dtype=np.int64)[None, :]
    full = StepBinding(ort_engine, ort_engine.new_cache()).run(chunk, all_logits=True)
    last = StepBinding(ort_engine, ort_engine.new_cache()).run(chunk, all_logits=False)
    assert full.shape == (200, ort_engine.folder.vocab_size) and last.shape == (ort_engine.folder.vocab_size,)
    np.testing.assert_array_equal(last, full[-1])


def test_same_seed_same_tokens_and_other_seed_differs(ort_engine):
    prompt = _chat(ort_engine, "Write a short poem about rivers.")
    kwargs = dict(temperature=1.0, top_p=0.95, max_tokens=32, ignore_eos=True)
    first = _tokens(ort_engine, prompt, seed=1234, **kwargs)
    assert first == _tokens(ort_engine, prompt, seed=1234, **kwargs)
    assert first != _tokens(ort_engine, prompt, seed=99, **kwargs)


def test_top_k_one_is_greedy(ort_engine):
    prompt = _chat(ort_engine, "Name three colours.")
    greedy = _tokens(ort_engine, prompt, max_tokens=24)
    assert _tokens(ort_engine, prompt, max_tokens=24, temperature=0.8, top_k=1, seed=3) == greedy


def test_max_tokens_is_honoured_and_reported_as_length(ort_engine):
    stats = GenerationStats()
    chunks = list(ort_engine.generate(_chat(ort_engine, "Count to one hundred."),
                                      SamplingParams(max_tokens=7, ignore_eos=True), stats=stats))
    assert sum(len(c.token_ids) for c in chunks) == 7
    assert chunks[-1].finish_reason == "length" and stats.predicted_n == 7


@pytest.fixture(params=["ort", "og"])
def either_engine(request):
    """Both engines emit through the same TokenEmitter: stop strings and EOS behave alike."""
    return request.getfixturevalue(f"{request.param}_engine")


def test_stop_string_cuts_the_text_and_finishes_with_stop(either_engine):
    prompt = _chat(either_engine, "Count from 1 to 20, separated by commas.")
    full = "".join(c.text for c in either_engine.generate(prompt, SamplingParams(max_tokens=60)))
    assert "5" in full
    stop = full[full.index("5"):full.index("5") + 2]
    chunks = list(either_engine.generate(prompt, SamplingParams(max_tokens=60, stop=(stop,))))
    text = "".join(c.text for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_eos_finishes_with_stop_and_ignore_eos_runs_to_max_tokens(either_engine):
    prompt = _chat(either_engine, "Say hi.")
    chunks = list(either_engine.generate(prompt, SamplingParams(max_tokens=200)))
    assert chunks[-1].finish_reason == "stop"
    produced = sum(len(c.token_ids) for c in chunks)
    chunks = list(either_engine.generate(prompt, SamplingParams(max_tokens=produced + 3, ignore_eos=True)))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == produced + 3


def test_streamed_text_equals_decoding_all_tokens(either_engine):
    chunks = list(either_engine.generate(_chat(either_engine, "Tell me about Tokyo."), SamplingParams(max_tokens=40)))
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == either_engine.tokenizer.decode(ids)


def test_prompt_longer_than_context_is_a_clear_error(ort_engine):
    too_long = [100] * (ort_engine.folder.context_length + 5)
    with pytest.raises(GenerationError, match="context holds"):
        list(ort_engine.generate(too_long, SamplingParams(max_tokens=1)))


def test_negative_max_tokens_is_rejected():
    with pytest.raises(GenerationError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_a_cache_holding_the_prefix_is_reused_and_gives_the_same_tokens(ort_engine):
    prompt = _chat(ort_engine, "What is a hash table?")
    cache = ort_engine.new_cache()
    first = _tokens(ort_engine, prompt, max_tokens=16)
    list(ort_engine.generate(prompt[:-3], SamplingParams(max_tokens=1), cache=cache))
    stats = GenerationStats()
    again = [t for c in ort_engine.generate(prompt, SamplingParams(max_tokens=16), stats=stats, cache=cache)
             for t in c.token_ids]
    assert stats.cache_n == len(prompt) - 3
    assert again == first


def test_ttft_and_decode_speed_are_measured(ort_engine):
    stats = GenerationStats()
    list(ort_engine.generate(_chat(ort_engine, "Hello!"), SamplingParams(max_tokens=8, ignore_eos=True), stats=stats))
    assert 0 < stats.ttft_s < 60 and stats.predicted_per_second > 0
    assert stats.prompt_ms > 0


def test_dense_cache_grows_without_losing_tokens(ort_engine):
    cache = DenseKVCache(ort_engine.layout, initial_tokens=16)
    ids = list(range(1000, 1040))
    ort_engine.forward(ids[:10], cache)
    before = cache.layer(0)[0].copy()
    ort_engine.forward(ids[10:], cache)
    assert cache.capacity >= 40 and cache.num_tokens == 40
    np.testing.assert_array_equal(cache.layer(0)[0][:, :10], before)
