"""Batched decode: one session run for the next token of several sequences gives each exactly what its own step
would (logits and the K/V row it writes; attention probes within a float's rounding), on the model's float form, on
the INT8 live form with a tiered cache that quantizes between steps, and on sliding-window layers past their window;
sequences decoding at once from their own threads batch and reply as they do alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lemonade_inferos.engine.binding import StepBinding
from lemonade_inferos.engine.build import BuildSpec, build_model
from lemonade_inferos.engine.decode_batch import DecodeStep
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import make_plan
from lemonade_inferos.kvcache.rope import RopeTables

LENGTHS = (37, 120, 75)   # prompts of other lengths: the batch's rows are right-padded


@pytest.fixture(scope="module")
def probe_engine(model_dir):
    return OrtEngine(model_dir, SessionPolicy(devices=["cpu"], kv_cache="int8", attention_probe=True))


def _tiered(engine):
    plan = make_plan("live8:dynamic", 32, 0.9, "attention")   # blocks sealed and demoted as tokens arrive
    return TieredKVCache(engine.layout_for(plan), plan, RopeTables.from_onnx(engine.folder.onnx_path))


def _prefilled(engine, make_cache, prompts):
    caches = []
    for prompt in prompts:
        caches.append(make_cache())
        StepBinding(engine, caches[-1]).run(np.asarray(prompt)[None, :], all_logits=False)
    return caches


def _prompts(corpus_ids, lengths=LENGTHS):
    return [corpus_ids[index * 200:index * 200 + length] for index, length in enumerate(lengths)]


def _batched_step(engine, caches, tokens, probing):
    """One batched run of ``tokens`` after ``caches``, committed as the engine commits a step; logits and probes."""
    form = engine.form_for(caches[0].layout, "decode")
    steps = []
    for cache, token in zip(caches, tokens):
        cache.reserve(1)
        probes = ([np.empty((1, 1, 1, cache.num_tokens + 1), dtype=np.float32) for _ in engine.probe_outputs]
                  if probing else None)
        steps.append(DecodeStep(engine.decode_batch(form), object(), cache, token,
                                np.empty((1, 1, engine.folder.vocab_size), dtype=np.float32), probes, None,
                                lambda: None))
    steps[0].batch.run(steps)
    for step in steps:
        engine.observe(step.cache, step.probes, 1)
        step.cache.commit([step.token])
    return [step.logits[0, 0].copy() for step in steps], [step.probes for step in steps]


def _single_step(engine, cache, token):
    binding = StepBinding(engine, cache)
    logits, probes = binding._forward(np.asarray([[token]]), all_logits=False)
    engine.observe(cache, probes, 1)
    cache.commit([token])
    return logits[0, -1].copy(), probes


def _held(cache):
    return [(key[0, :, :cache.num_tokens].copy(), value[0, :, :cache.num_tokens].copy())
            for key, value in cache.arrays()]


def _decode_side_by_side(engine, batched, alone, steps, probing=False):
    """``steps`` greedy tokens: ``batched`` in batches, ``alone`` one sequence at a time; each batch row must be
    what the sequence's own step gives."""
    tokens = [11, 12, 13]
    for step in range(steps):
        rows, row_probes = _batched_step(engine, batched, tokens, probing)
        for index, (cache, token) in enumerate(zip(alone, tokens)):
            logits, probes = _single_step(engine, cache, token)
            assert np.array_equal(rows[index], logits), f"step {step}, sequence {index}: logits differ"
            if probing:
                for got, want in zip(row_probes[index], probes):
                    # the mean over heads sums in another order beside other rows: within a float's rounding
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6,
                                               err_msg=f"step {step}, sequence {index}: probes differ")
        tokens = [int(row.argmax()) for row in rows]


@pytest.mark.parametrize("form", ["float", "int8-tiered"])
def test_a_batch_gives_each_sequence_what_its_own_step_would(form, ort_engine, probe_engine, corpus_ids):
    engine = ort_engine if form == "float" else probe_engine
    make_cache = engine.new_cache if form == "float" else lambda: _tiered(probe_engine)
    batched, alone = (_prefilled(engine, make_cache, _prompts(corpus_ids)) for _ in range(2))
    # 40 steps: the mirror follows appends, then the tiered cache's in-place edits (seals, demotions)
    _decode_side_by_side(engine, batched, alone, 40, probing=form != "float")
    for one, other in zip(batched, alone):
        assert one.num_tokens == other.num_tokens
        for (key, value), (want_key, want_value) in zip(_held(one), _held(other)):
            assert np.array_equal(key, want_key) and np.array_equal(value, want_value)


def test_a_cache_edited_between_batches_is_copied_again_from_the_edit(ort_engine, corpus_ids):
    batched, alone = (_prefilled(ort_engine, ort_engine.new_cache, _prompts(corpus_ids)) for _ in range(2))
    _batched_step(ort_engine, batched, [5, 6, 7], False)
    for cache, token in zip(alone, [5, 6, 7]):
        _single_step(ort_engine, cache, token)
    for caches in (batched, alone):   # the first sequence drops its last 20 tokens and runs other ones
        caches[0].truncate(caches[0].num_tokens - 20)
        StepBinding(ort_engine, caches[0]).run(np.asarray(corpus_ids[900:920])[None, :], all_logits=False)
    rows, _ = _batched_step(ort_engine, batched, [8, 9, 10], False)
    for index, (cache, token) in enumerate(zip(alone, [8, 9, 10])):
        logits, _ = _single_step(ort_engine, cache, token)
        assert np.array_equal(rows[index], logits), f"sequence {index}"


def test_sliding_window_layers_batch_exactly_past_their_window(corpus_ids):
    """Gemma 3 270M (a 512-token window on five layers of every six), INT8 live: rows longer and shorter than the
    window in one batch, each row's window its own."""
    engine = OrtEngine(build_model(BuildSpec("gemma3-270m", "int4")), SessionPolicy(devices=["cpu"], kv_cache="int8"))
    assert engine.folder.sliding_window == 512 and engine.layout.min_tokens >= 512
    prompts = [corpus_ids[:length] for length in (600, 300, 700)]
    batched, alone = (_prefilled(engine, engine.new_cache, prompts) for _ in range(2))
    _decode_side_by_side(engine, batched, alone, 8)


def test_sequences_decoding_at_once_batch_and_reply_as_they_do_alone(probe_engine, corpus_ids):
    engine = probe_engine
    prompts = [corpus_ids[index * 300:index * 300 + length] for index, length in enumerate((40, 90, 60, 120))]   # one chunk each
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def reply(prompt):
        return [token for chunk in engine.generate(prompt, params, cache=_tiered(engine))
                for token in chunk.token_ids]

    alone = [reply(prompt) for prompt in prompts]
    before = engine.turns.batched_runs
    together: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, reply(prompts[i])))
               for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert engine.turns.batched_runs > before, "the sequences' decode steps never ran together"
    assert engine.turns.sequences == 0 and not engine.turns._batches, "the mirror outlived the sequences"
