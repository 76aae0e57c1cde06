"""Segment reuse: an agent's sliding history (the oldest exchange dropped after the system prompt) reuses the
previous turn's KV for the shifted exchanges, keys re-rotated, the seam recomputed; the first token's
distribution stays close to a cold prefill of the same prompt."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lemonade_inferos.engine.binding import StepBinding
from lemonade_inferos.engine.prompt_cache import take_splices
from lemonade_inferos.eval.scoring import log_softmax
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT4, named_plan
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.reuse import PrefixReuse
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.kvcache.segments import MIN_RUN, find_shifted_run, recompute_count
from lemonade_inferos.kvcache.warm import WarmCaches

SALT = PrefixStore.salt("model", "format")
SYSTEM = "You are a careful assistant for a small hardware shop. Answer briefly and cite the catalogue. " * 4
EXCHANGES = [("Do you stock the 40-pin ribbon cable?", "Yes, in 10 cm and 30 cm lengths, aisle four."),
             ("What about crimp connectors for it?", "We carry IDC crimp connectors in packs of ten."),
             ("Is there a crimping tool I can borrow?", "The counter lends one against a small deposit."),
             ("Can you hold two packs until Friday?", "Yes, I put two packs aside under your name.")]


def test_find_shifted_run_finds_the_exchanges_after_a_dropped_one():
    source = list(range(100)) + list(range(1000, 1040)) + list(range(2000, 2200))
    prompt = list(range(100)) + list(range(2000, 2200)) + [7, 8, 9]
    run = find_shifted_run(source, prompt, 100)
    assert (run.prompt_start, run.source_start, run.length) == (100, 140, 200)
    assert run.shift == -40
    assert find_shifted_run(source, list(range(100)) + [5] * 80, 100) is None
    assert find_shifted_run(source, prompt[:100 + MIN_RUN - 1] + [1], 100) is None, "too short to be worth it"
    assert recompute_count(200, 0.25) == 50 and recompute_count(40, 0.1) == 16 and recompute_count(10, 0.5) == 10


def _prompt(tokenizer, exchanges, question):
    messages = [{"role": "system", "content": SYSTEM}]
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def _kld(p_logits, q_logits) -> float:
    p, q = log_softmax(p_logits[None]), log_softmax(q_logits[None])
    return float((np.exp(p) * (p - q)).sum())


@pytest.mark.parametrize("share", [0.25, 0.0])
def test_a_sliding_history_reuses_the_shifted_exchanges(ort_engine, share):
    tokenizer, layout = ort_engine.tokenizer, ort_engine.layout
    rope = RopeTables.from_onnx(ort_engine.folder.onnx_path)
    plan = replace(named_plan("fp"), segment_recompute=share)
    previous = _prompt(tokenizer, EXCHANGES[:3], "And the price?")
    current = _prompt(tokenizer, EXCHANGES[1:4], "And the price?")

    reuse = PrefixReuse(PrefixStore(2**30), WarmCaches(1, min_tokens=32))
    earlier = TieredKVCache(layout, plan, rope)
    ort_engine.forward(previous, earlier)
    reuse.release(earlier, SALT, keep_warm=True)

    cache, reused = reuse.acquire(current, SALT, layout, plan, TIER_INT4, lambda: TieredKVCache(layout, plan, rope))
    splices = take_splices(cache, current, reused)
    assert len(splices) == 1
    splice = splices[0]
    assert reused < splice.at and splice.recomputed == recompute_count(splice.recomputed + len(splice), share)
    logits = ort_engine.prefill(StepBinding(ort_engine, cache), current[reused:], splices, reused)
    assert cache.token_ids == current and cache.num_tokens == len(current)
    shifted = len(_prompt(tokenizer, EXCHANGES[1:3], "")) - len(_prompt(tokenizer, [], ""))  # exchanges 2 and 3
    assert cache.kv_stats().segment_tokens == len(splice) and splice.recomputed + len(splice) >= shifted - 8
    assert cache.stats.segment_recomputed_tokens == splice.recomputed

    cold = TieredKVCache(layout, plan, rope)
    reference = ort_engine.prefill(StepBinding(ort_engine, cold), current)
    kld = _kld(reference, logits)
    assert int(np.argmax(logits)) == int(np.argmax(reference))
    assert kld < 0.05, kld

    unshifted = TieredKVCache(layout, plan, rope)   # the same KV without re-rotating the keys: far worse
    ort_engine.forward(current[:splice.at], unshifted)
    unshifted.insert_segment(splice.token_ids, splice.keys, splice.values,
                             unshifted.new_positions(len(splice))[0])
    wrong = ort_engine.forward(current[splice.at + len(splice):], unshifted)[-1]
    assert _kld(reference, wrong) > kld


def test_segment_reuse_off_prefills_the_shifted_exchanges(ort_engine):
    tokenizer, layout = ort_engine.tokenizer, ort_engine.layout
    rope = RopeTables.from_onnx(ort_engine.folder.onnx_path)
    plan = named_plan("fp")   # segment_recompute None: off
    reuse = PrefixReuse(PrefixStore(2**30), WarmCaches(1, min_tokens=32))
    earlier = TieredKVCache(layout, plan, rope)
    ort_engine.forward(_prompt(tokenizer, EXCHANGES[:3], "And the price?"), earlier)
    reuse.release(earlier, SALT, keep_warm=True)
    current = _prompt(tokenizer, EXCHANGES[1:4], "And the price?")
    cache, reused = reuse.acquire(current, SALT, layout, plan, TIER_INT4, lambda: TieredKVCache(layout, plan, rope))
    assert cache.splices == [] and reused < len(current) // 2


@pytest.mark.parametrize("plan_name", ["fp", "int8"])
def test_the_prefix_store_finds_shifted_blocks_by_their_own_tokens(ort_engine, plan_name):
    """No warm cache (another chat ran since): the store's segment index finds the shifted exchanges' blocks,
    whatever prefix they were parked under, and the chain is followed from there."""
    tokenizer, layout = ort_engine.tokenizer, ort_engine.layout
    rope = RopeTables.from_onnx(ort_engine.folder.onnx_path)
    plan = replace(named_plan(plan_name), segment_recompute=0.1)
    long_exchanges = [(q * 3, a * 3) for q, a in EXCHANGES]
    store = PrefixStore(2**30)
    reuse = PrefixReuse(store, WarmCaches(0))   # no warm caches at all
    earlier = TieredKVCache(layout, plan, rope)
    ort_engine.forward(_prompt(tokenizer, long_exchanges[:3], "And the price?"), earlier)
    reuse.release(earlier, SALT, keep_warm=False)

    current = _prompt(tokenizer, long_exchanges[1:4], "And the price?")
    cache, reused = reuse.acquire(current, SALT, layout, plan, TIER_INT4, lambda: TieredKVCache(layout, plan, rope))
    splices = take_splices(cache, current, reused)
    assert len(splices) == 1 and len(splices[0]) % 32 == 0 and len(splices[0]) >= 64
    assert store.stats()["segment_blocks"] == len(splices[0]) // 32
    logits = ort_engine.prefill(StepBinding(ort_engine, cache), current[reused:], splices, reused)
    cold = TieredKVCache(layout, plan, rope)
    reference = ort_engine.prefill(StepBinding(ort_engine, cold), current)
    assert int(np.argmax(logits)) == int(np.argmax(reference)) and _kld(reference, logits) < 0.05
    assert all(block.ref_cnt == 0 for block in store.pool.cached_blocks()), "every block is unpinned again"
