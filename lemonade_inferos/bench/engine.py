"""``inferos bench engine``: our engine against og.Generator on the same greedy prompt.

With a GGUF (where llama-cpp-python is installed), llama.cpp on the shipped
Q4_1 weights is timed in the same loop (see ``bench/llamacpp.py``).

Timing: all engines are loaded in this process, warmed up, then run
alternately (og, ours, og, ours, ...) so drift on a busy machine hits both
alike; medians are reported. Peak RSS: each engine is loaded and run once more
in a fresh child process of its own (RSS never shrinks back after an engine is
freed, so in-process peaks would charge one engine for the other).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
from pathlib import Path
from typing import Any

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.bench.rss import PeakRssSampler
from lemonade_inferos.corpus import corpus_text
from lemonade_inferos.reports import plot_path_for, write_json
from lemonade_inferos.engine.og_engine import OgEngine
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.types import GenerationStats

ENGINES = ("og", "inferos")
LLAMACPP = "llama.cpp"


def _make_engine(name: str, model_dir: Path, policy: SessionPolicy | None, gguf: Path | None = None,
                 context_length: int = 4096) -> Any:
    if name == LLAMACPP:
        from lemonade_inferos.bench.llamacpp import LlamaCppEngine

        threads = policy.intra_op_num_threads if policy and policy.intra_op_num_threads else None
        return LlamaCppEngine(gguf, context_length, threads)
    return OgEngine(model_dir) if name == "og" else OrtEngine(model_dir, policy)


def _run_once(engine: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens = [t for chunk in engine.generate(prompt, params, stats=stats) for t in chunk.token_ids]
    return tokens, stats


def _summarize(prompt_len: int, stats: list[GenerationStats]) -> dict[str, Any]:
    prefill_s = [s.prompt_ms / 1000 for s in stats]
    return {
        "prefill_tps": statistics.median(prompt_len / p for p in prefill_s),
        "decode_tps": statistics.median(s.predicted_per_second for s in stats),
        "ttft_s": statistics.median(s.ttft_s for s in stats),
        "runs": [{"prefill_s": p, "ttft_s": s.ttft_s, "decode_tps": s.predicted_per_second,
                  "new_tokens": s.predicted_n} for p, s in zip(prefill_s, stats)],
    }


def _peak_rss_child(name: str, model_dir: str, prompt: list[int], new_tokens: int, policy_json: str,
                    gguf: str | None, queue: Any) -> None:
    policy = SessionPolicy.model_validate_json(policy_json)
    with PeakRssSampler() as rss:
        engine = _make_engine(name, Path(model_dir), policy, Path(gguf) if gguf else None,
                              len(prompt) + new_tokens + 64)
        _run_once(engine, prompt, new_tokens)
    queue.put(rss.peak_mb)


def measure_peak_rss(name: str, model_dir: Path, prompt: list[int], new_tokens: int,
                     policy: SessionPolicy, gguf: Path | None = None) -> float:
    """Peak RSS (MiB) of a fresh process that loads ``name`` and runs the prompt once."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child,
                       args=(name, str(model_dir), prompt, new_tokens, policy.model_dump_json(),
                             str(gguf) if gguf else None, queue))
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return float(peak)


def condition_rows(model_dir: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Decode tok/s of og.Generator and our engine where users run: at one intra-op thread, and with another
    process keeping a core busy (our engine then runs as the server's thread policy runs it: no spinning)."""
    og = OgEngine(model_dir)
    ours = {"1 thread": OrtEngine(model_dir, SessionPolicy(devices=["cpu"], intra_op_num_threads=1)),
            "2 threads, 1 core busy": OrtEngine(model_dir, SessionPolicy(devices=["cpu"], allow_spinning=False)),
            "2 threads spinning, 1 core busy": OrtEngine(model_dir, SessionPolicy(devices=["cpu"]))}
    rows: dict[str, Any] = {}
    for condition, engine in ours.items():
        with busy_core() if "busy" in condition else contextlib.nullcontext():
            tps: dict[str, list[float]] = {"og": [], "inferos": []}
            for _ in range(repeats):
                for name, runner in (("og", og), ("inferos", engine)):
                    tps[name].append(_run_once(runner, prompt, new_tokens)[1].predicted_per_second)
        og_tps, our_tps = statistics.median(tps["og"]), statistics.median(tps["inferos"])
        rows[condition] = {"og_decode_tps": og_tps, "inferos_decode_tps": our_tps, "decode_speedup": our_tps / og_tps}
    return rows


def run_engine_bench(model_dir: Path, prompt_tokens: int, new_tokens: int, repeats: int = 3,
                     policy: SessionPolicy | None = None, gguf: Path | None = None,
                     conditions: bool = True) -> dict[str, Any]:
    """Measure the engines; returns the JSON document (see ``inferos bench engine --help``)."""
    policy = policy or SessionPolicy()
    names = ENGINES + ((LLAMACPP,) if gguf else ())
    engines = {name: _make_engine(name, model_dir, policy, gguf, prompt_tokens + new_tokens + 64) for name in names}
    prompt = engines["inferos"].tokenizer.encode(corpus_text())[:prompt_tokens]
    for engine in engines.values():
        _run_once(engine, prompt[:32], 4)  # warm-up: first-run allocations are not what we measure
    stats: dict[str, list[GenerationStats]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, engine in engines.items():
            run_tokens, run_stats = _run_once(engine, prompt, new_tokens)
            tokens.setdefault(name, run_tokens)
            stats[name].append(run_stats)
    results: dict[str, Any] = {"model": str(model_dir), "prompt_tokens": len(prompt), "new_tokens": new_tokens,
                               "repeats": repeats, "engines": list(names)}
    for name in names:
        results[name] = _summarize(len(prompt), stats[name])
    results["inferos"]["session"] = engines["inferos"].report.to_dict()
    del engines
    for name in names:
        results[name]["peak_rss_mb"] = measure_peak_rss(name, model_dir, prompt, new_tokens, policy, gguf)
    if conditions:
        results["conditions"] = condition_rows(model_dir, prompt, new_tokens, repeats)
    results["identical_tokens"] = sum(a == b for a, b in zip(tokens["og"], tokens["inferos"]))
    results["compared_tokens"] = max(len(tokens["og"]), len(tokens["inferos"]))
    results["decode_speedup"] = results["inferos"]["decode_tps"] / results["og"]["decode_tps"]
    results["prefill_speedup"] = results["inferos"]["prefill_tps"] / results["og"]["prefill_tps"]
    if gguf:
        results[LLAMACPP]["gguf"] = str(gguf)
        results["vs_llamacpp"] = {"decode": results["inferos"]["decode_tps"] / results[LLAMACPP]["decode_tps"],
                                  "prefill": results["inferos"]["prefill_tps"] / results[LLAMACPP]["prefill_tps"]}
    return results


def plot_engine_bench(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"), ("ttft_s", "TTFT (s)"),
               ("peak_rss_mb", "peak RSS (MiB)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 3.6))
    names = results.get("engines", list(ENGINES))
    labels = {"og": "og.Generator", "inferos": "inferos", LLAMACPP: "llama.cpp"}
    colors = {"og": "#999999", "inferos": "#2a7ab9", LLAMACPP: "#d98c2b"}
    for ax, (key, label) in zip(axes, metrics):
        bars = ax.bar([labels[e] for e in names], [results[e][key] for e in names], color=[colors[e] for e in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(label)
    versus = results.get("vs_llamacpp")
    fig.suptitle(f"{Path(results['model']).name}: {results['prompt_tokens']} prompt + {results['new_tokens']} new "
                 f"tokens, decode x{results['decode_speedup']:.2f} og.Generator"
                 + (f", x{versus['decode']:.2f} llama.cpp (GGUF Q4_1)" if versus else "")
                 + f"; identical to og {results['identical_tokens']}/{results['compared_tokens']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_engine(model_dir: Path, prompt_tokens: int, new_tokens: int, repeats: int, json_path: Path,
                 policy: SessionPolicy | None = None, gguf: Path | None = None,
                 conditions: bool = True) -> dict[str, Any]:
    results = run_engine_bench(model_dir, prompt_tokens, new_tokens, repeats, policy, gguf, conditions)
    write_json(json_path, results)
    plot_engine_bench(results, plot_path_for(json_path))
    return results
