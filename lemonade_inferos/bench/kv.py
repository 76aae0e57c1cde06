"""``inferos bench kv``: decode speed with the tiered cache against the plain cache, same run.

For each context length the same corpus prompt is prefilled, then ``new_tokens``
are decoded greedily with (a) the plain dense cache, (b) the tiered cache under
the chosen plan on the model's fp32 KV, (c) the same plan on the INT8 live form
(the server's default), and (d) when built, the native INT8-KV model variant (ORT
GroupQueryAttention with static per-channel scales) with a plain cache. Runs
alternate between modes and medians are reported, with each mode's greedy
agreement with the plain cache (tokens until the first difference).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from lemonade_inferos.corpus import corpus_text
from lemonade_inferos.reports import plot_grouped_bars, write_json
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.rope import RopeTables


def _decode(engine: OrtEngine, prompt: list[int], new_tokens: int, cache: Any
            ) -> tuple[GenerationStats, Any, list[int]]:
    stats = GenerationStats()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens = [t for chunk in engine.generate(prompt, params, stats=stats, cache=cache) for t in chunk.token_ids]
    return stats, cache, tokens


def _agreement(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def run_kv_bench(engine: OrtEngine, contexts: list[int], new_tokens: int, plan_name: str, repeats: int,
                 native: OrtEngine | None = None, tiered_engine: OrtEngine | None = None) -> dict[str, Any]:
    """``tiered_engine``: the engine the tiered cache runs on (the server's: with attention probes when the plan
    ranks blocks by attention); ``engine`` (plain graph, dense cache) is the baseline."""
    from lemonade_inferos.kvcache.plan import build_plans

    tiered_engine = tiered_engine or engine
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    plan, live = build_plans([plan_name, f"live8:{plan_name}"], 64, 0.0, bool(tiered_engine.probe_outputs))
    ids = engine.tokenizer.encode(corpus_text()[: max(contexts) * 8])
    modes: dict[str, tuple[OrtEngine, Callable[[], Any]]] = {
        "plain": (engine, lambda: engine.new_cache(engine.full_precision_layout)),
        f"tiered:{plan_name}": (tiered_engine, lambda: TieredKVCache(tiered_engine.layout_for(plan), plan, rope)),
        f"tiered:live8:{plan_name}": (tiered_engine,
                                      lambda: TieredKVCache(tiered_engine.layout_for(live), live, rope)),
    }
    if native is not None:
        modes["native_int8_kv"] = (native, native.new_cache)
    results: dict[str, Any] = {"model": str(engine.folder.path), "plan": plan_name, "importance": plan.importance,
                               "attention_probe": bool(tiered_engine.probe_outputs), "new_tokens": new_tokens,
                               "repeats": repeats, "contexts": {}}
    for context in contexts:
        prompt = ids[:min(context, engine.layout.max_tokens - new_tokens)]  # room for the new tokens
        runs: dict[str, list[GenerationStats]] = {m: [] for m in modes}
        kv: dict[str, Any] = {}
        tokens: dict[str, list[int]] = {}
        for _ in range(repeats):
            for mode, (eng, make_cache) in modes.items():
                stats, cache, tokens[mode] = _decode(eng, prompt, new_tokens, make_cache())
                runs[mode].append(stats)
                if isinstance(cache, TieredKVCache):
                    kv[mode] = cache.kv_stats().to_dict()
        row = {mode: {"decode_tps": statistics.median(s.predicted_per_second for s in stats),
                      "ttft_s": statistics.median(s.ttft_s for s in stats),
                      "greedy_agreement_with_plain": _agreement(tokens[mode], tokens["plain"])}
               for mode, stats in runs.items()}
        fp32_tiered = row[f"tiered:{plan_name}"]["decode_tps"]
        for mode in row:
            row[mode]["ratio_vs_plain"] = row[mode]["decode_tps"] / row["plain"]["decode_tps"]
            row[mode]["ratio_vs_fp32_tiered"] = row[mode]["decode_tps"] / fp32_tiered
            if mode in kv:
                row[mode]["kv"] = kv[mode]
        results["contexts"][str(context)] = row
    return results


def plot_kv_bench(results: dict[str, Any], path: Path) -> None:
    contexts = list(results["contexts"])
    modes = list(results["contexts"][contexts[0]])
    series = {mode: [results["contexts"][c][mode]["decode_tps"] for c in contexts] for mode in modes}
    plot_grouped_bars(path, [f"{c} ctx" for c in contexts], series, "decode tok/s",
                      f"{Path(results['model']).name}: decode with {results['new_tokens']} new tokens")


def bench_kv(engine: OrtEngine, contexts: list[int], new_tokens: int, plan_name: str, repeats: int,
             json_path: Path, native: OrtEngine | None = None, tiered_engine: OrtEngine | None = None
             ) -> dict[str, Any]:
    results = run_kv_bench(engine, contexts, new_tokens, plan_name, repeats, native, tiered_engine)
    write_json(json_path, results)
    plot_kv_bench(results, json_path.with_suffix(".png"))
    return results
