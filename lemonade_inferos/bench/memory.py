"""``inferos bench memory``: peak RSS of a fresh process serving one request, by KV form and context length.

Each row is its own spawned process (RSS never shrinks back after an engine is freed, so rows cannot share one):
it loads the engine, then runs one greedy request of ``context - new_tokens`` prompt tokens of
``pydoc_data.topics`` plus ``new_tokens`` generated, with the cache the server would use, while a thread samples
RSS. Rows:

- ``og.Generator``: the baseline, its own KV (only up to the model's context);
- ``inferos fp32-live``: our engine with the tiered cache on the model's fp32 KV (what ran before INT8 live);
- ``inferos int8-live``: the INT8 live form, the server's default (``kv.live_format: int8``);
- ``inferos int8-live + dynamic@0.9``: the same under memory pressure 0.9 (INT4 demotion and eviction);
- ``llama.cpp f16`` / ``llama.cpp q8_0``: its KV types on the shipped GGUF, where llama-cpp-python is installed.

Past the model's context (16K on SmolLM2's 8K) our rows hold at most the context, evicting the least important
blocks; og.Generator and llama.cpp cannot run there and their rows say so.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from lemonade_inferos.reports import plot_grouped_bars, plot_path_for, write_json

ROWS = ("og.Generator", "inferos fp32-live", "inferos int8-live", "inferos int8-live + dynamic@0.9",
        "llama.cpp f16", "llama.cpp q8_0")
PLANS = {"inferos fp32-live": "dynamic", "inferos int8-live": "live8:dynamic",
         "inferos int8-live + dynamic@0.9": "live8:dynamic@0.9"}


def _calibrate(model_dir: str, queue: Any) -> None:
    """Load the INT8 live form once, so its scales are calibrated and kept before any row is measured (a row's
    process would otherwise load the float graph beside it to calibrate, which is not what serving costs)."""
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    engine = OrtEngine(Path(model_dir), SessionPolicy(devices=["cpu"], kv_cache="int8"))
    queue.put(engine.live_kv_report())


def _in_child(target: Any, *args: Any) -> Any:
    queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def _child(row: str, model_dir: str, context: int, new_tokens: int, gguf: str | None, queue: Any) -> None:
    try:
        queue.put(_measure(row, Path(model_dir), context, new_tokens, gguf))
    except Exception as exc:  # reported as the row's reason: one engine's failure is not the benchmark's
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _measure(row: str, model_dir: Path, context: int, new_tokens: int, gguf: str | None) -> dict[str, Any]:
    from lemonade_inferos.bench.rss import PeakRssSampler, current_rss_mb
    from lemonade_inferos.corpus import corpus_ids
    from lemonade_inferos.engine.sampling import SamplingParams
    from lemonade_inferos.engine.types import GenerationStats

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    stats, cache = GenerationStats(), None
    if row == "og.Generator":
        from lemonade_inferos.engine.og_engine import OgEngine

        engine = OgEngine(model_dir, context_length=context)
    elif row.startswith("llama.cpp"):
        from lemonade_inferos.bench.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(Path(gguf), context, kv_type=row.split()[-1])
    else:
        from lemonade_inferos.engine.ort_engine import OrtEngine
        from lemonade_inferos.engine.session import SessionPolicy
        from lemonade_inferos.kvcache.manager import TieredKVCache
        from lemonade_inferos.kvcache.plan import make_plan
        from lemonade_inferos.kvcache.rope import rope_tables

        plan = make_plan(PLANS[row], 64, 0.0, "attention")
        engine = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], attention_probe=True,
                                                    kv_cache=plan.live_kv))
        cache = TieredKVCache(engine.layout_for(plan), plan, rope_tables(engine))
    from lemonade_inferos.engine.tokenizer import ChatTokenizer

    prompt = corpus_ids(ChatTokenizer.from_folder(model_dir), context - new_tokens)
    loaded = current_rss_mb()
    with PeakRssSampler() as sampler:
        for _ in engine.generate(prompt, params, stats=stats, cache=cache):
            pass
    result = {"rss_after_load_mb": loaded, "peak_rss_mb": sampler.peak_mb, "peak_over_load_mb": sampler.peak_mb - loaded,
              "prompt_tokens": len(prompt), "new_tokens": stats.predicted_n, "decode_tps": stats.predicted_per_second}
    if cache is not None:
        kv = cache.kv_stats()
        result.update(live_kv_bytes=kv.live_bytes, working_buffer_used_bytes=kv.working_buffer_used_bytes,
                      at_rest_kv_bytes=kv.kv_bytes, tokens_held=kv.tokens_held, live_form=kv.live_form,
                      live_vs_fp16_of_held=kv.working_buffer_used_bytes / (kv.tokens_held * kv.fp16_bytes
                                                                            / kv.tokens_seen))
    return result


def _skip_reason(row: str, context: int, model_context: int, gguf: Path | None) -> str | None:
    if row.startswith("llama.cpp") and gguf is None:
        return "llama-cpp-python is not installed (or no GGUF): pip install llama-cpp-python"
    if not row.startswith("inferos") and context > model_context:
        return f"beyond the model's context ({model_context} tokens); only our evicting cache runs there"
    return None


def run_memory_bench(model_dir: Path, contexts: list[int], new_tokens: int = 32, gguf: Path | None = None,
                     progress=lambda message: None) -> dict[str, Any]:
    from lemonade_inferos.engine.model_folder import load_model_folder

    model_context = load_model_folder(model_dir).context_length
    results: dict[str, Any] = {"model": str(model_dir), "new_tokens": new_tokens, "model_context": model_context,
                               "rows": list(ROWS), "contexts": {}}
    results["live_kv"] = _in_child(_calibrate, str(model_dir))
    for context in contexts:
        rows: dict[str, Any] = {}
        for row in ROWS:
            reason = _skip_reason(row, context, model_context, gguf)
            if reason is not None:
                rows[row] = {"skipped": reason}
                continue
            progress(f"{row} at {context} tokens")
            rows[row] = _in_child(_child, row, str(model_dir), context, new_tokens, str(gguf) if gguf else None)
        base = rows.get("inferos fp32-live", {}).get("peak_rss_mb")
        for row in rows.values():
            if base and "peak_rss_mb" in row:
                row["peak_rss_below_fp32_live_mb"] = base - row["peak_rss_mb"]
        results["contexts"][str(context)] = rows
    return results


def plot_memory_bench(results: dict[str, Any], path: Path) -> None:
    contexts = list(results["contexts"])
    measured = [r for r in results["rows"] if any("peak_rss_mb" in results["contexts"][c].get(r, {}) for c in contexts)]
    series = {row: [results["contexts"][c].get(row, {}).get("peak_rss_mb", 0.0) for c in contexts] for row in measured}
    plot_grouped_bars(path, [f"{c} tokens" for c in contexts], series, "peak RSS of a fresh process (MiB)",
                      f"{Path(results['model']).name}: one request ({results['new_tokens']} new tokens)",
                      value_format="%.0f", size=(9, 4.2))


def bench_memory(model_dir: Path, contexts: list[int], new_tokens: int, json_path: Path, gguf: Path | None = None,
                 progress=lambda message: None) -> dict[str, Any]:
    results = run_memory_bench(model_dir, contexts, new_tokens, gguf, progress)
    write_json(json_path, results)
    plot_memory_bench(results, plot_path_for(json_path))
    return results
