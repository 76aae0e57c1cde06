"""``inferos eval ppl``: what a KV plan costs in quality and what it saves in bytes.

Protocol: the first ``context`` tokens (times ``segments``) of CPython's
``pydoc_data.topics`` are fed through a plain full-precision cache and through
each plan's tiered cache in lockstep, in chunks no longer than the plan's
recent window, so every chunk attends over history that the plan has already
quantized or evicted. For every position we compare the plan's next-token
distribution with the full-precision one: PPL (and ΔPPL), KL(fp || plan),
top-1 agreement. Bytes per token are the plan's at-rest KV bytes over the
tokens seen, against FP16 for the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lemonade_inferos.corpus import corpus_ids
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.eval.scoring import ScoreAccumulator, log_softmax
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import KVPlan, build_plans
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.reports import write_json

DEFAULT_PLANS = ("fp", "int8", "int4", "dynamic", "streaming")


def eval_ppl(engine: OrtEngine, plans: list[str | KVPlan], context: int = 2048, recent_window: int = 64,
             segments: int = 1, pressure: float = 0.0, progress=lambda done, total: None) -> list[dict[str, Any]]:
    """Score every plan against the full-precision cache; one result dict per plan."""
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    ids = corpus_ids(engine.tokenizer, context * segments + 1)
    chunk = recent_window
    built = build_plans(plans, recent_window, pressure, bool(engine.probe_outputs))
    scores = {p.name: ScoreAccumulator() for p in built}
    caches: dict[str, TieredKVCache] = {}
    stats: dict[str, list] = {p.name: [] for p in built}
    edges: dict[str, list] = {}  # INT8 live codes at the range's edge (saturated, or exactly the calibrated max)
    total_chunks = segments * ((context + chunk - 1) // chunk)
    done = 0
    for segment in range(segments):
        tokens = ids[segment * context: (segment + 1) * context + 1]
        reference = engine.new_cache(engine.full_precision_layout)
        caches = {p.name: TieredKVCache(engine.layout_for(p), p, rope) for p in built}
        for start in range(0, len(tokens) - 1, chunk):
            piece = tokens[start:start + chunk]
            targets = np.asarray(tokens[start + 1:start + 1 + len(piece)])
            ref = log_softmax(engine.forward(piece, reference))[: len(targets)]
            for name, cache in caches.items():
                scores[name].add(log_softmax(engine.forward(piece, cache))[: len(targets)], ref, targets)
            done += 1
            progress(done, total_chunks)
        for name, cache in caches.items():
            stats[name].append(cache.kv_stats())
            edges.setdefault(name, []).append(cache.buffer.edge_share())
    results = []
    for plan in built:
        kv = stats[plan.name]
        kv_bytes = sum(s.kv_bytes for s in kv)
        seen = sum(s.tokens_seen for s in kv)
        results.append({
            "plan": plan.name, **scores[plan.name].summary(),
            "kv_bytes_per_token": kv_bytes / seen,
            "fp16_bytes_per_token": sum(s.fp16_bytes for s in kv) / seen,
            "model_dtype_bytes_per_token": sum(s.model_dtype_bytes for s in kv) / seen,
            "compression_vs_fp16": kv_bytes / sum(s.fp16_bytes for s in kv),
            "tokens_by_tier": kv[-1].tokens_by_tier, "pressure": plan.pressure,
            "recent_window": plan.recent_window, "sink_tokens": plan.sink_tokens, "block_size": plan.block_size,
            "importance": plan.importance, "context": context, "segments": segments, "chunk_tokens": chunk,
            "quantize_seconds": sum(s.quantize_seconds for s in kv),
            "live_form": kv[-1].live_form,
            "int8_codes_at_range_edge": (float(np.mean(edges[plan.name])) if edges[plan.name][0] is not None
                                         else None),
        })
    return results


def plot_ppl(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels against at-rest bytes per token: ΔPPL (symlog) and KLD (log; fp rows have none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        x = r["kv_bytes_per_token"] / 1024
        marker = "s" if r["plan"].startswith("llama.cpp") else "o"
        left.scatter(x, r["delta_ppl"], s=36, marker=marker)
        left.annotate(r["plan"], (x, r["delta_ppl"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if r["kld"] > 0:
            right.scatter(x, r["kld"], s=36, marker=marker)
            right.annotate(r["plan"], (x, r["kld"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    fp16 = results[0]["fp16_bytes_per_token"] / 1024
    for ax, label in ((left, "ΔPPL vs full-precision cache (symlog)"), (right, "KL(full || plan), per token (log)")):
        ax.axvline(fp16, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("KV bytes per token (KiB, at rest); dashed: FP16")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_yscale("symlog", linthresh=0.01)
    right.set_yscale("log")
    fig.suptitle(title + "; squares: llama.cpp against its own f16 KV", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict[str, Any]], json_path: Path, model_name: str) -> None:
    document = {**results[0], "model": model_name, "plans": results}
    write_json(json_path, document)
    r0 = results[0]  # the plot's title describes the protocol of our own rows
    plot_ppl(results, json_path.with_suffix(".png"),
             f"{model_name}: {r0['context']} tokens x{r0['segments']} of pydoc_data.topics, chunks of "
             f"{r0['chunk_tokens']}, window {r0['recent_window']}")


def eval_long_context(engine: OrtEngine, plan_name: str = "dynamic", total_tokens: int = 12288,
                      near: tuple[int, int] = (2048, 4096), far: tuple[int, int] = (8192, 12288),
                      chunk: int = 256, progress=lambda done, total: None) -> dict[str, Any]:
    """One continuous stream past the context length: PPL far away vs PPL near the start."""
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    plan = build_plans([plan_name], 64, 0.0, bool(engine.probe_outputs))[0]
    ids = corpus_ids(engine.tokenizer, total_tokens + 1)
    cache = TieredKVCache(engine.layout_for(plan), plan, rope)
    nll = np.zeros(len(ids) - 1)
    total = (len(ids) - 1 + chunk - 1) // chunk
    for index, start in enumerate(range(0, len(ids) - 1, chunk)):
        piece = ids[start:start + chunk]
        targets = np.asarray(ids[start + 1:start + 1 + len(piece)])
        logprobs = log_softmax(engine.forward(piece, cache))[: len(targets)]
        nll[start:start + len(targets)] = -logprobs[np.arange(len(targets)), targets]
        progress(index + 1, total)
    near_ppl = float(np.exp(nll[near[0]:near[1]].mean()))
    far_ppl = float(np.exp(nll[far[0]:far[1]].mean()))
    stats = cache.kv_stats()
    return {"plan": plan.name, "near": list(near), "far": list(far), "near_ppl": near_ppl, "far_ppl": far_ppl,
            "ratio": far_ppl / near_ppl, "context_length": engine.layout.max_tokens, "tokens": len(ids) - 1,
            "tokens_held": stats.tokens_held, "blocks_evicted": stats.blocks_evicted, "rebases": stats.rebases}
