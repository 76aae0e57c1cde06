"""Segment reuse scored over the corpus: how far a sliding history's reused KV moves the model's predictions.

Each sample cuts consecutive pieces of ``pydoc_data.topics`` into a "system prompt" S, three "exchanges"
A, B, C and a new part D. The previous sequence is S+A+B+C (kept warm); the current prompt is S+B+C+D, the oldest
exchange dropped, as an agent's sliding window does. D is scored teacher-forced after (1) a cold prefill of
S+B+C and (2) the warm cache served by segment reuse (B+C shifted, keys re-rotated, the seam recomputed): the
KL divergence of every D position's distribution from the cold one, top-1 agreement, and the perplexity of D
both ways. Score with D no longer than the recent window when the plan quantizes (the issue's rule for
quantized KV).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

from lemonade_inferos.eval.scoring import log_softmax


def eval_segment_reuse(engine: Any, plan_name: str, shares: list[float], samples: int = 8, live_format: str = "model",
                       sizes: tuple[int, int, int] = (256, 200, 64),
                       progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    from lemonade_inferos.corpus import corpus_ids
    from lemonade_inferos.engine.binding import StepBinding
    from lemonade_inferos.engine.prompt_cache import take_splices
    from lemonade_inferos.kvcache.manager import TieredKVCache
    from lemonade_inferos.kvcache.plan import TIER_INT4, named_plan
    from lemonade_inferos.kvcache.prefix_store import PrefixStore
    from lemonade_inferos.kvcache.reuse import PrefixReuse
    from lemonade_inferos.kvcache.rope import RopeTables
    from lemonade_inferos.kvcache.warm import WarmCaches

    system, exchange, new = sizes
    per_sample = system + 3 * exchange + new
    ids = corpus_ids(engine.tokenizer, samples * per_sample)
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    salt = PrefixStore.salt(engine.folder.fingerprint, "eval")
    rows: dict[float, list[dict[str, float]]] = {share: [] for share in shares}
    for index in range(samples):
        base = index * per_sample
        s, a, b, c, d = (ids[base:base + system], *(ids[base + system + i * exchange:base + system + (i + 1)
                                                        * exchange] for i in range(3)),
                         ids[base + system + 3 * exchange:base + per_sample])
        current = s + b + c + d
        for share in shares:
            plan = replace(named_plan(plan_name), segment_recompute=share, live_kv=live_format)
            layout = engine.layout_for(plan)
            reuse = PrefixReuse(PrefixStore(2**30), WarmCaches(1, min_tokens=32))
            earlier = TieredKVCache(layout, plan, rope)
            _run(engine, earlier, s + a + b + c)
            reuse.release(earlier, salt, keep_warm=True)
            warm, reused = reuse.acquire(current[:-len(d)] + d[:1], salt, layout, plan, TIER_INT4,
                                         lambda: TieredKVCache(layout, plan, rope))
            prompt = current[:-len(d)] + d[:1]
            splices = take_splices(warm, prompt, reused)
            engine.prefill(StepBinding(engine, warm), prompt[reused:], splices, reused)
            cold = TieredKVCache(layout, plan, rope)
            _run(engine, cold, prompt)
            got, want = log_softmax(engine.forward(d[1:], warm)), log_softmax(engine.forward(d[1:], cold))
            targets = np.asarray(d[2:], dtype=np.int64)   # row i predicts d[i + 2]; the last row predicts past D
            rows[share].append({
                "kld": float((np.exp(want) * (want - got)).sum(-1).mean()),
                "top1": float((want.argmax(-1) == got.argmax(-1)).mean()),
                "nll_cold": float(-want[np.arange(len(targets)), targets].mean()),
                "nll_reuse": float(-got[np.arange(len(targets)), targets].mean()),
                "segment_tokens": sum(len(x) for x in splices), "recomputed": sum(x.recomputed for x in splices)})
        progress(index + 1, samples)
    summary = {}
    for share, found in rows.items():
        nll_cold, nll_reuse = np.mean([r["nll_cold"] for r in found]), np.mean([r["nll_reuse"] for r in found])
        summary[str(share)] = {"kld": float(np.mean([r["kld"] for r in found])),
                               "kld_max": float(max(r["kld"] for r in found)),
                               "top1": float(np.mean([r["top1"] for r in found])),
                               "ppl_cold": float(np.exp(nll_cold)), "ppl_reuse": float(np.exp(nll_reuse)),
                               "delta_ppl": float(np.exp(nll_reuse) - np.exp(nll_cold)),
                               "segment_tokens": float(np.mean([r["segment_tokens"] for r in found])),
                               "recomputed": float(np.mean([r["recomputed"] for r in found]))}
    return {"plan": plan_name, "live_format": live_format, "samples": samples, "sizes": {"system": system, "exchange": exchange, "new": new},
            "shares": summary}


def _run(engine: Any, cache: Any, ids: list[int]) -> None:
    for start in range(0, len(ids), engine.prefill_chunk_tokens):
        engine.forward(ids[start:start + engine.prefill_chunk_tokens], cache)
