"""The INT8 live form's graph has two attention paths: a prompt chunk runs the float path over the dequantized
past and stores the codes the INT8 path would store; scoring and decode run the INT8 path in place."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.engine.binding import StepBinding
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import named_plan

PROMPT = list(range(300, 700))


@pytest.fixture(scope="module")
def engine(calibrated_model) -> OrtEngine:
    return OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"))


def _codes(cache) -> np.ndarray:
    n = cache.num_tokens
    return np.stack([np.stack([k[:, :, :n], v[:, :, :n]]) for k, v in cache.arrays()])


def test_the_int8_graph_has_a_float_prefill_path(engine):
    assert engine.form_for(engine.layout).graph.dual_attention


def test_a_prompt_chunk_on_the_float_path_stores_the_codes_and_logits_of_the_int8_path(engine):
    float_path, int8_path = engine.new_cache(), engine.new_cache()
    steps = StepBinding(engine, float_path)
    first = steps.run(np.asarray([PROMPT[:250]]), all_logits=False).copy()     # a cold chunk: float path
    logits = steps.run(np.asarray([PROMPT[250:]]), all_logits=False)           # over the INT8 history
    rows = engine.forward(PROMPT[:250], int8_path)                              # scoring: the INT8 path
    reference = engine.forward(PROMPT[250:], int8_path)
    assert float_path.num_tokens == int8_path.num_tokens == len(PROMPT)
    a, b = _codes(float_path).astype(np.int16), _codes(int8_path).astype(np.int16)
    # layer 0 reads the same inputs on both paths: a rounding tie at most; deeper layers read hidden states that
    # differ by the float sums' order (measured: 90% of all codes equal, none more than 6 apart)
    assert np.abs(a[0] - b[0]).max() <= 1
    assert np.mean(a == b) > 0.85
    np.testing.assert_allclose(first, rows[-1], atol=0.5)     # measured: 0.08 and 0.23 (logits of ~20)
    np.testing.assert_allclose(logits, reference[-1], atol=0.5)
    assert int(np.argmax(first)) == int(np.argmax(rows[-1]))
    assert int(np.argmax(logits)) == int(np.argmax(reference[-1]))




def test_a_probed_graph_scores_a_chunk_on_both_paths_alike(calibrated_model):
    """The attention probe (attention-ranked eviction, the shadow estimate) reads a prompt chunk's scores from the
    float path and scoring's from the INT8 path: the same attention over the same tokens."""
    engine = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"),
                       attention_probe_layers=(0, 5))
    assert engine.form_for(engine.layout).graph.dual_attention
    plan = replace(named_plan("dynamic", recent_window=32), importance="attention")
    float_path, int8_path = TieredKVCache(engine.layout, plan), TieredKVCache(engine.layout, plan)
    StepBinding(engine, float_path).run(np.asarray([PROMPT[:96]]), all_logits=False)
    engine.forward(PROMPT[:96], int8_path)
    np.testing.assert_array_equal(float_path.attention.rows[:96], int8_path.attention.rows[:96])
    assert int8_path.attention.mass[:96].min() > 0
    np.testing.assert_allclose(float_path.attention.mass[:96], int8_path.attention.mass[:96], rtol=0.03)


def test_a_chunk_probed_on_its_last_rows_computes_the_same_and_scores_them_as_the_int8_path(calibrated_model):
    """A long prompt's chunk is probed on its last rows only, beside an attention that returns no probabilities
    (ONNX Runtime's flash path): its logits are the unprobed graph's, and its rows are the INT8 path's."""
    engine = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"),
                       attention_probe_layers=(0, 5))
    graph = engine.form_for(engine.layout).graph
    assert graph.dual_attention and graph.row_probe
    plain = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"))
    plan = replace(named_plan("dynamic", recent_window=32), importance="attention")
    probed, scored = TieredKVCache(engine.layout, plan), TieredKVCache(engine.layout, plan)
    seen: list[list[np.ndarray]] = []
    for cache in (probed, scored):
        cache.observe_attention = lambda probes, num_new: seen.append([p.copy() for p in probes])
    logits = StepBinding(engine, probed).run(np.asarray([PROMPT[:96]]), all_logits=False, probe_rows=16)
    unprobed = StepBinding(plain, plain.new_cache()).run(np.asarray([PROMPT[:96]]), all_logits=False)
    np.testing.assert_array_equal(logits, unprobed)
    engine.forward(PROMPT[:96], scored)   # scoring: the INT8 path, every row
    rows, every = seen
    assert [p.shape for p in rows] == [(1, 1, 16, 96)] * 2 and [p.shape for p in every] == [(1, 1, 96, 96)] * 2
    for last, full in zip(rows, every):
        np.testing.assert_allclose(last[0, 0], full[0, 0, -16:], atol=0.02)
        assert np.allclose(np.triu(last[0, 0], 81), 0)   # causal: row i (position 80 + i) sees up to 80 + i


def test_a_probe_returns_the_mean_over_heads_one_row_per_query(calibrated_model):
    """A chunk's probe output is ``[1, 1, S, T]``, not ``[1, H, S, T]`` (64 MiB per probe layer for 256 tokens over
    6.9K): every query row is still a distribution over the tokens it could see."""
    engine = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"]), attention_probe_layers=(0, 5))
    plan = replace(named_plan("dynamic", recent_window=32), importance="attention")
    cache = TieredKVCache(engine.layout, plan)
    seen = []
    cache.observe_attention = lambda probes, num_new: seen.append([p.copy() for p in probes])
    StepBinding(engine, cache).run(np.asarray([PROMPT[:40]]), all_logits=False)
    (probes,) = seen
    assert [p.shape for p in probes] == [(1, 1, 40, 40)] * 2
    np.testing.assert_allclose(probes[0].sum(axis=-1), 1.0, rtol=1e-4)
    assert np.allclose(np.triu(probes[1][0, 0], 1), 0)   # causal: no row sees a later token


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_any_gqa_folder_gets_the_float_prefill_path_and_agrees_with_its_int8_path(tiny_models, arch):
    """Not SmolLM2-only: other GroupQueryAttention folders (Qwen3's q/k norms, other head counts) get the dual
    graph, and a prompt chunk's logits on the float path match the INT8 path's."""
    engine = OrtEngine(tiny_models[arch], SessionPolicy(devices=["cpu"], kv_cache="int8"))
    assert engine.form_for(engine.layout).graph.dual_attention
    prompt = PROMPT[:48]
    float_path, int8_path = engine.new_cache(), engine.new_cache()
    logits = StepBinding(engine, float_path).run(np.asarray([prompt]), all_logits=False)
    reference = engine.forward(prompt, int8_path)[-1]
    np.testing.assert_allclose(logits, reference, atol=1e-3 * float(np.abs(reference).max()) + 1e-4)
    assert np.mean(_codes(float_path) == _codes(int8_path)) > 0.95
