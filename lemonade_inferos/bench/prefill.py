"""``inferos bench prefill``: the INT8 live form against the float live form, on what a chat turn costs.

The server keeps the working KV as INT8 codes by default (half of FP16) and decodes over them; a prompt chunk
runs the INT8 graph's float attention path (``engine/dual_attention.py``). The question this answers is whether
the lean form is also the fast one. For each live form, under the same tiered plan as the server runs it, one
run is: a cold ``history``-token prompt (TTFT), then ``turn`` new tokens over that history in the same cache
(what a chat's next turn prefills) and ``decode`` tokens after them. A first round (not counted) loads each
form's session; runs alternate between the forms; medians and the spread (min, max) are reported, with each
measure's ratio INT8 / float in the same run and the live KV each form holds (against the FP16 bytes of the same
tokens).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lemonade_inferos.corpus import corpus_text
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.reports import plot_grouped_bars, write_json

MEASURES = {"cold_prefill_tps": "cold prompt", "turn_prefill_tps": "turn over history", "decode_tps": "decode"}


def _generate(engine: OrtEngine, prompt: list[int], max_tokens: int, cache: TieredKVCache) -> GenerationStats:
    stats = GenerationStats()
    for _ in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), stats=stats,
                             cache=cache):
        pass
    return stats


def _one_run(engine: OrtEngine, make_cache, history: list[int], turn: list[int], decode: int) -> dict[str, Any]:
    cache = make_cache()
    cold = _generate(engine, history, 1, cache)
    cache.truncate(len(history))  # the reply's token is not part of the next prompt
    warm = _generate(engine, history + turn, decode, cache)
    assert warm.cache_n == len(history), "the turn did not reuse the history"
    kv = cache.kv_stats()
    return {"cold_prefill_tps": cold.prompt_per_second, "turn_prefill_tps": warm.prompt_per_second,
            "decode_tps": warm.predicted_per_second, "live_kv_bytes": kv.live_bytes, "fp16_kv_bytes": kv.fp16_bytes}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_prefill_bench(engine: OrtEngine, history_tokens: int, turn_tokens: int, decode_tokens: int, repeats: int,
                      plan_name: str = "dynamic") -> dict[str, Any]:
    from lemonade_inferos.kvcache.plan import build_plans

    float_plan, int8_plan = build_plans([plan_name, f"live8:{plan_name}"], 64, 0.0, bool(engine.probe_outputs))
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    forms = {"float": float_plan, "int8": int8_plan}
    ids = engine.tokenizer.encode(corpus_text()[: (history_tokens + turn_tokens) * 8])
    history, turn = ids[:history_tokens], ids[history_tokens:history_tokens + turn_tokens]
    runs: dict[str, list[dict[str, Any]]] = {form: [] for form in forms}
    for repeat in range(repeats + 1):  # the first round loads each form's session and is not counted
        for form, plan in forms.items():
            row = _one_run(engine, lambda: TieredKVCache(engine.layout_for(plan), plan, rope), history, turn,
                           decode_tokens)
            if repeat:
                runs[form].append(row)
    results: dict[str, Any] = {
        "model": str(engine.folder.path), "plan": plan_name, "history_tokens": len(history),
        "turn_tokens": len(turn), "decode_tokens": decode_tokens, "repeats": repeats,
        "threads": engine.policy.intra_op_num_threads, "forms": {}, "ratio_int8_vs_float": {}}
    for form, rows in runs.items():
        entry = {m: _summary([r[m] for r in rows]) for m in MEASURES}
        entry["live_kv_bytes"] = rows[-1]["live_kv_bytes"]
        entry["live_kv_vs_fp16"] = rows[-1]["live_kv_bytes"] / rows[-1]["fp16_kv_bytes"]
        entry["dual_attention"] = engine.form_for(engine.layout_for(forms[form])).graph.dual_attention
        results["forms"][form] = entry
    for measure in MEASURES:
        results["ratio_int8_vs_float"][measure] = (results["forms"]["int8"][measure]["median"]
                                                   / results["forms"]["float"][measure]["median"])
    return results


def plot_prefill_bench(results: dict[str, Any], path: Path) -> None:
    series = {form: [entry[m]["median"] for m in MEASURES] for form, entry in results["forms"].items()}
    plot_grouped_bars(path, list(MEASURES.values()), series, "tok/s",
                      f"{Path(results['model']).name}: live forms, {results['history_tokens']}-token history, "
                      f"{results['turn_tokens']}-token turn")


def bench_prefill(engine: OrtEngine, history_tokens: int, turn_tokens: int, decode_tokens: int, repeats: int,
                  json_path: Path, plan_name: str = "dynamic") -> dict[str, Any]:
    results = run_prefill_bench(engine, history_tokens, turn_tokens, decode_tokens, repeats, plan_name)
    write_json(json_path, results)
    plot_prefill_bench(results, json_path.with_suffix(".png"))
    return results
