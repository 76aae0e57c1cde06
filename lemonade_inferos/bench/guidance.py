"""``inferos bench guidance``: what constrained decoding costs, against unconstrained decoding in the same run.

The same prompt and the same number of greedy tokens (``ignore_eos``), decoded plainly and under grammars whose
masks differ in size: ``(.|\\n)*`` admits every token (the mask is all cost and no change: it measures the
overhead alone), the tool-call grammar of ``tool_choice: auto`` (free text), and a JSON schema whose reply is a
long array of short strings. Runs alternate (plain, each grammar, plain, ...) so drift hits all; medians are
reported with the ratio against plain decoding.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lemonade_inferos.engine.guidance import Guidance
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.reports import plot_grouped_bars, plot_path_for, write_json

LIST_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64, "maxItems": 64}


def grammars() -> dict[str, Guidance | None]:
    from lemonade_inferos.host import tools
    from lemonade_inferos.host.structured import compact

    calculator = {"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
    return {"unconstrained": None, "all tokens allowed": Guidance("regex", "(.|\\n)*"),
            "tool_choice auto": tools.setup([calculator], "auto", None).guidance,
            "JSON schema (array of strings)": Guidance.json_schema(compact(LIST_SCHEMA))}


def bench_guidance(model_dir: Path, prompt_tokens: int, new_tokens: int, repeats: int, json_path: Path
                   ) -> dict[str, Any]:
    from lemonade_inferos.corpus import corpus_text

    engine = OrtEngine(model_dir, SessionPolicy(devices=["cpu"]))
    prompt = engine.tokenizer.encode(corpus_text()[:20_000])[:prompt_tokens]
    rates: dict[str, list[float]] = {name: [] for name in grammars()}
    for _ in range(repeats + 1):  # the first round warms up (the grammar tokenizer is built once)
        for name, guidance in grammars().items():
            stats = GenerationStats()
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=guidance is None or name.startswith("all"),
                                    guidance=guidance)
            for _chunk in engine.generate(prompt, params, stats=stats):
                pass
            rates[name].append((stats.predicted_n, stats.predicted_per_second))
    base = statistics.median(r for _, r in rates["unconstrained"][1:])
    rows = {name: {"decode_tps": statistics.median(r for _, r in values[1:]),
                   "tokens": statistics.median(n for n, _ in values[1:])} for name, values in rates.items()}
    for row in rows.values():
        row["vs_unconstrained"] = row["decode_tps"] / base
    results = {"model": str(model_dir), "prompt_tokens": len(prompt), "new_tokens": new_tokens, "repeats": repeats,
               "rows": rows}
    write_json(json_path, results)
    plot_grouped_bars(plot_path_for(json_path), list(rows), {"decode tok/s": [r["decode_tps"] for r in rows.values()]},
                      "tokens/s", "Constrained decoding vs unconstrained (greedy)", size=(8, 4))
    return results
