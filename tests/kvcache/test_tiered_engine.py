"""The tiered cache driving the real model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.eval.ppl import eval_ppl, write_report
from lemonade_inferos.eval.scoring import log_softmax
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import named_plan, plan_for_mode
from lemonade_inferos.kvcache.rope import RopeTables


@pytest.fixture(scope="module")
def rope(ort_engine):
    return RopeTables.from_onnx(ort_engine.folder.onnx_path)


def _kl(p_logits, q_logits):
    p, q = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def test_evict_nothing_plan_is_bit_identical_to_the_plain_cache(ort_engine, corpus_ids, rope):
    plain, tiered = ort_engine.new_cache(), TieredKVCache(ort_engine.layout, named_plan("fp"), rope)
    for start in range(0, 256, 64):
        chunk = corpus_ids[start:start + 64]
        np.testing.assert_array_equal(ort_engine.forward(chunk, tiered), ort_engine.forward(chunk, plain))


def test_evict_nothing_plan_generates_the_same_tokens(ort_engine, corpus_ids, rope):
    prompt = corpus_ids[:200]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    plain = [t for c in ort_engine.generate(prompt, params) for t in c.token_ids]
    cache = TieredKVCache(ort_engine.layout, named_plan("fp"), rope)
    assert [t for c in ort_engine.generate(prompt, params, cache=cache) for t in c.token_ids] == plain


class MaskPositionsCache(TieredKVCache):
    """What GroupQueryAttention would do without position_ids: positions follow the cache length."""

    def new_positions(self, num_new):
        return np.arange(self.num_tokens, self.num_tokens + num_new, dtype=np.int64)[None, :]


def test_true_positions_after_eviction_stay_close_to_the_full_cache(ort_engine, corpus_ids, rope):
    history, probe = corpus_ids[:300], corpus_ids[300:316]
    full = ort_engine.new_cache()
    ort_engine.forward(history, full)
    reference = ort_engine.forward(probe, full)
    kls = {}
    for name, cls in (("true", TieredKVCache), ("mask", MaskPositionsCache)):
        cache = cls(ort_engine.layout, named_plan("fp"), rope)
        ort_engine.forward(history, cache)
        # seal blocks (no quantization; no rank is below 0.001) so they can be evicted by hand
        cache.plan = replace(named_plan("fp"), evict_below=0.001)
        cache._seal_ready_blocks()
        for block in list(cache.blocks)[1:4]:  # evict 96 tokens from the middle
            cache._evict(block)
        assert cache.num_tokens == 300 - 96
        kls[name] = _kl(reference, ort_engine.forward(probe, cache))
    assert kls["true"] < 0.2              # measured 0.11 (tokens 36-132 of 300 evicted)
    assert kls["true"] * 10 < kls["mask"]  # measured 2.2 with mask-derived positions


def test_generation_continues_past_the_context_window_by_eviction(ort_engine, corpus_ids, rope):
    small = replace(ort_engine.layout, max_tokens=256)
    short_rope = RopeTables(rope.cos[:320], rope.sin[:320])  # forces position re-indexing, too
    cache = TieredKVCache(small, plan_for_mode("dynamic", recent_window=32), short_rope)
    stats = GenerationStats()
    chunks = list(ort_engine.generate(corpus_ids[:200], SamplingParams(max_tokens=400, ignore_eos=True),
                                      stats=stats, cache=cache))
    assert stats.predicted_n == 400 and chunks[-1].finish_reason == "length"
    assert cache.stats.blocks_evicted > 0 and cache.stats.rebases > 0
    assert cache.num_tokens <= 256
    text = "".join(c.text for c in chunks)
    assert len(set(text.split())) > 20  # still producing varied text, not a collapsed loop


def test_plain_cache_stops_with_length_at_the_context_window(ort_engine, corpus_ids):
    from lemonade_inferos.engine.kv import DenseKVCache

    cache = DenseKVCache(replace(ort_engine.layout, max_tokens=256))
    stats = GenerationStats()
    chunks = list(ort_engine.generate(corpus_ids[:200], SamplingParams(max_tokens=400, ignore_eos=True),
                                      stats=stats, cache=cache))
    assert chunks[-1].finish_reason == "length" and stats.predicted_n == 57


def test_eval_ppl_reports_quality_and_bytes(ort_engine, tmp_path):
    results = eval_ppl(ort_engine, ["int8", "int4", "streaming"], context=320, recent_window=32)
    by_plan = {r["plan"]: r for r in results}
    assert abs(by_plan["int8"]["delta_ppl"]) < 0.05 and by_plan["int8"]["kld"] < 0.002
    assert by_plan["int8"]["kld"] < by_plan["int4"]["kld"] < by_plan["streaming"]["kld"]
    assert (by_plan["streaming"]["kv_bytes_per_token"] < by_plan["int4"]["kv_bytes_per_token"]
            < by_plan["int8"]["kv_bytes_per_token"] < by_plan["int8"]["fp16_bytes_per_token"])
    path = tmp_path / "ppl.json"
    write_report(results, path, "smollm2")
    document = json.loads(path.read_text())
    for key in ("plan", "ppl", "ppl_fp", "delta_ppl", "kld", "top1", "kv_bytes_per_token", "fp16_bytes_per_token"):
        assert key in document
    assert path.with_suffix(".png").stat().st_size > 0
