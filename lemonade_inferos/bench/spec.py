"""``inferos bench spec``: speculative decoding and the thread policy, against og.Generator in the same run.

Four prompt sets (a RAG answer quoting a corpus passage, a code edit of a stdlib function, a chat follow-up that
repeats the previous answer, an open-ended chat), each decoded greedily by:

    og.Generator plain | og.Generator with its own n-gram speculation (ngram_size 3, 4 draft tokens)
    our engine plain   | ngram (always drafts) | auto (the server's default: drafting stops where it does not pay)

under three conditions: one intra-op thread; two threads on a quiet machine; two threads with another process
keeping a core busy (the bench starts and stops it). Our two-thread engine follows the server's thread policy
(``controller/threads.py``): spinning when quiet, not when a core is busy. og.Generator runs with its own
defaults throughout (it decodes on one core). Reported: decode tok/s (median over repeats), acceptance, and
tokens identical to our plain decode in the same condition.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import statistics
import textwrap
from pathlib import Path
from typing import Any, Callable

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.corpus import corpus_text
from lemonade_inferos.engine.og_engine import OgEngine
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.speculative import SpeculationConfig
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.reports import plot_path_for, write_json

CONDITIONS = ("1 thread", "2 threads", "2 threads, 1 core busy")
CONFIGS = ("og plain", "og ngram", "inferos plain", "inferos ngram", "inferos auto")


def prompt_sets() -> dict[str, list[dict[str, str]]]:
    """Chat messages per kind of prompt, all from text installed with Python (nothing downloaded)."""
    import json as json_module

    text = corpus_text()
    passage = text[12000:13600]
    function = textwrap.dedent(inspect.getsource(json_module.dumps))[:1800]
    answer = text[30000:31200]
    return {
        "rag": [{"role": "system", "content": "Answer from the document, quoting it."},
                {"role": "user", "content": f"Document:\n{passage}\n\nSummarize the document, quoting its key "
                                            "sentences word for word."}],
        "code": [{"role": "user", "content": f"```python\n{function}\n```\nRewrite this function with type "
                                             "hints on its parameters; keep everything else exactly as it is."}],
        "chat-followup": [{"role": "user", "content": "How do I read the Python reference on this topic?"},
                          {"role": "assistant", "content": answer},
                          {"role": "user", "content": "Repeat your answer, adding a one-line title first."}],
        "open-chat": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}],
    }


def _decode(engine: Any, prompt: list[int], new_tokens: int, speculation: SpeculationConfig | None = None,
            og_ngram: bool = False) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    stats, tokens = GenerationStats(), []
    kwargs = {"speculation": speculation} if isinstance(engine, OrtEngine) else {"ngram": og_ngram}
    for chunk in engine.generate(prompt, params, stats=stats, **kwargs):
        tokens.extend(chunk.token_ids)
    return {"tps": stats.predicted_per_second, "tokens": tokens, "drafted": stats.drafted_n,
            "accepted": stats.accepted_n}


def bench_spec(model_dir: Path, new_tokens: int, repeats: int, json_path: Path,
               progress: Callable[[str], None] = lambda msg: None, draft_model: str | None = None) -> dict[str, Any]:
    og = OgEngine(model_dir)
    one = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], intra_op_num_threads=1))
    spinning = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], allow_spinning=True))
    calm = OrtEngine(model_dir, SessionPolicy(devices=["cpu"], allow_spinning=False))
    sets = {name: one.tokenizer.encode(one.tokenizer.apply_chat_template(messages))
            for name, messages in prompt_sets().items()}
    ngram, auto = SpeculationConfig(mode="ngram", min_accept_rate=0.0), SpeculationConfig(mode="auto")
    draft = SpeculationConfig(mode="draft", draft_model=draft_model, min_accept_rate=0.0) if draft_model else None
    results: dict[str, Any] = {"model": model_dir.name, "new_tokens": new_tokens, "repeats": repeats,
                               "prompt_tokens": {name: len(ids) for name, ids in sets.items()}, "rows": []}
    for condition in CONDITIONS:
        ours = one if condition == "1 thread" else calm if "busy" in condition else spinning
        runners = {"og plain": lambda ids: _decode(og, ids, new_tokens),
                   "og ngram": lambda ids: _decode(og, ids, new_tokens, og_ngram=True),
                   "inferos plain": lambda ids: _decode(ours, ids, new_tokens),
                   "inferos ngram": lambda ids: _decode(ours, ids, new_tokens, ngram),
                   "inferos auto": lambda ids: _decode(ours, ids, new_tokens, auto)}
        if draft is not None:
            runners["inferos draft"] = lambda ids: _decode(ours, ids, new_tokens, draft)
        with busy_core() if "busy" in condition else contextlib.nullcontext():
            for set_name, ids in sets.items():
                progress(f"{condition}: {set_name}")
                runs = {name: [run(ids) for _ in range(repeats)] for name, run in runners.items()}
                reference = runs["inferos plain"][0]["tokens"]
                for name, samples in runs.items():
                    last = samples[-1]
                    results["rows"].append({
                        "condition": condition, "set": set_name, "config": name,
                        "decode_tps": statistics.median(s["tps"] for s in samples),
                        "drafted": last["drafted"], "accepted": last["accepted"],
                        "accept_rate": last["accepted"] / last["drafted"] if last["drafted"] else None,
                        "identical_tokens": sum(a == b for a, b in zip(last["tokens"], reference)),
                        "first_divergence": next((i for i, (a, b) in enumerate(zip(last["tokens"], reference))
                                                  if a != b), None)})
    results["ratios"] = _ratios(results["rows"])
    write_json(json_path, results)
    plot_spec(results, plot_path_for(json_path))
    return results


def _ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per condition and set: each config's decode speed over og plain and over our plain decode."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        key = f"{row['condition']} | {row['set']}"
        base = {r["config"]: r["decode_tps"] for r in rows if r["condition"] == row["condition"]
                and r["set"] == row["set"]}
        table.setdefault(key, {})[row["config"]] = {"vs_og_plain": row["decode_tps"] / base["og plain"],
                                                    "vs_og_ngram": row["decode_tps"] / base["og ngram"],
                                                    "vs_inferos_plain": row["decode_tps"] / base["inferos plain"]}
    return table


def plot_spec(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["prompt_tokens"])
    configs = [c for c in (*CONFIGS, "inferos draft") if any(r["config"] == c for r in results["rows"])]
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(5 * len(CONDITIONS), 4.5), sharey=True)
    width = 0.8 / len(configs)
    for axis, condition in zip(axes, CONDITIONS):
        for index, config in enumerate(configs):
            values = [next(r["decode_tps"] for r in results["rows"] if r["condition"] == condition
                           and r["set"] == s and r["config"] == config) for s in sets]
            axis.bar([x + index * width for x in range(len(sets))], values, width, label=config)
        axis.set_title(condition)
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(sets))], sets, rotation=20)
    axes[0].set_ylabel("decode tok/s (greedy)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"speculative decoding, {results['model']}, {results['new_tokens']} new tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict[str, Any]) -> str:
    return json.dumps(results["ratios"], indent=1)
