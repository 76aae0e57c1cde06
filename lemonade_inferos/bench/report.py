"""``inferos bench report``: the design document's reproducible benchmark, measured through real servers.

Baseline is ``lemonade-server`` without the plugin (og.Generator, what Lemonade runs); inferos is the same
server with ``--plugin inferos``. Both play the same prompt sets (``prompt_sets.py``) with the document's
generation config and fixed seed: per prompt, warm-up runs, then measured runs. Each request is a streamed chat
completion timed at the client: first-token latency is measured at the first content chunk (not the document's
0.3 x latency estimate), latency at the stream's end; tokens come from the server's usage. Memory is the peak
RSS of the server process, sampled while it serves. The quality score of a reply is the mean log-probability
per token the full-precision model (our engine, float KV, in this process) gives it after its prompt: the same
judge for both modes, so a change in the score is a change in what the served path generates.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lemonade_inferos.bench.multiturn import stream_turn
from lemonade_inferos.bench.prompt_sets import GENERATION, SET_SIZES, SETS, PromptItem, prompt_items
from lemonade_inferos.bench.rss import PeakRssSampler
from lemonade_inferos.metrics.document import latency_summary_ms

Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass(frozen=True)
class ReportConfig:
    """How much to run: the document's 3 warm-up and 10 measured runs per prompt by default."""

    warmup: int = 3
    runs: int = 10
    sets: tuple[str, ...] = SETS
    prompts_per_set: int | None = None     # None: every prompt of each set
    max_tokens: int = GENERATION["max_tokens"]
    agent_turns: int = 4
    ablation: bool = True
    ablation_sets: tuple[str, ...] = ("conversation", "reasoning")   # the document's ablation plays these two

    @classmethod
    def quick(cls, **changes: Any) -> "ReportConfig":
        """A few minutes: 1 warm-up and 2 runs of 2 prompts per set, 48-token replies, 3-turn agent chats."""
        return replace(cls(warmup=1, runs=2, prompts_per_set=2, max_tokens=48, agent_turns=3), **changes)

    def prompts(self, set_name: str) -> int:
        return min(SET_SIZES[set_name], self.prompts_per_set or SET_SIZES[set_name])

    def requests(self, sets: tuple[str, ...] | None = None) -> int:
        """How many requests one mode sends (warm-ups included): the progress bar's total."""
        per_item = {s: self.agent_turns if s == "agent" else 1 for s in SETS}
        return sum(self.prompts(s) * (self.warmup + self.runs) * per_item[s] for s in (sets or self.sets))

    @property
    def generation(self) -> dict[str, Any]:
        return {**GENERATION, "max_tokens": self.max_tokens}


def play_item(base: str, model: str, item: PromptItem, generation: dict[str, Any], cache_prompt: bool = True,
              progress: Progress = lambda n: None) -> list[dict[str, Any]]:
    """Send the item's turns in one chat; one record per request (the chat's messages kept for scoring)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": item.system}] if item.system else []
    sampling = {k: v for k, v in generation.items() if k != "max_tokens"}
    records = []
    for turn, user in enumerate(item.turns, start=1):
        messages.append({"role": "user", "content": user})
        record = stream_turn(base, model, messages, generation["max_tokens"], cache_prompt=cache_prompt, **sampling)
        record.update(set=item.set_name, prompt_id=item.prompt_id, turn=turn, messages=list(messages))
        messages.append({"role": "assistant", "content": record["text"]})
        records.append(record)
        progress(1)
    return records


def play_sets(base: str, pid: int, model: str, config: ReportConfig, sets: tuple[str, ...] | None = None,
              cache_prompt: bool = True, progress: Progress = lambda n: None) -> dict[str, Any]:
    """Warm-up and measured runs of every prompt of ``sets`` against one server; measured records and the
    server's peak RSS while it served them."""
    measured: list[dict[str, Any]] = []
    with PeakRssSampler(interval_s=0.05, pid=pid) as rss:
        for set_name in sets or config.sets:
            for index in range(config.prompts(set_name)):
                for warm in range(config.warmup):
                    play_item(base, model, prompt_items(set_name, index, -1 - warm, config.agent_turns),
                              config.generation, cache_prompt, progress)
                for run in range(config.runs):
                    for record in play_item(base, model, prompt_items(set_name, index, run, config.agent_turns),
                                            config.generation, cache_prompt, progress):
                        measured.append({**record, "run": run})
    return {"records": measured, "peak_rss_mb": rss.peak_mb}


def reference_scores(model_dir: Path, records: list[dict[str, Any]], chunk: int = 256) -> None:
    """Set each record's ``quality_score``: the mean log-probability per reply token under the full-precision
    model after the record's prompt (None for an empty reply)."""
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.eval.scoring import log_softmax

    engine = OrtEngine(model_dir)
    tokenizer = engine.tokenizer
    for record in records:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(record["messages"]))
        reply = tokenizer.encode(record["text"])
        if not reply:
            record["quality_score"] = None
            continue
        cache = engine.new_cache(engine.full_precision_layout)
        for start in range(0, len(prompt) - 1, chunk):
            engine.forward(prompt[start:min(start + chunk, len(prompt) - 1)], cache)
        logprobs = log_softmax(engine.forward([prompt[-1], *reply[:-1]], cache))
        record["quality_score"] = float(logprobs[np.arange(len(reply)), reply].mean())


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The document's metrics of a group of measured requests: latency, throughput, first-token latency (measured),
    quality, tokens."""
    latency = [r["latency_s"] for r in records]
    tokens = [r["completion_tokens"] or 0 for r in records]
    scores = [r["quality_score"] for r in records if r.get("quality_score") is not None]
    total_s = sum(latency)
    return {
        "requests": len(records),
        "latency": latency_summary_ms(latency),
        "first_token_latency": {**latency_summary_ms([r["ttft_s"] for r in records]),
                                "measurement_method": "measured at the client: first content chunk - request sent"},
        "throughput": {"tokens_per_second": sum(tokens) / total_s if total_s else None,
                       "requests_per_second": len(records) / total_s if total_s else None,
                       "calculation": "completion tokens / total request time"},
        "quality": {"mean_score": statistics.mean(scores) if scores else None,
                    "std_score": statistics.pstdev(scores) if len(scores) > 1 else None,
                    "method": "mean log-probability per reply token under the full-precision model"},
        "tokens": {"mean_per_response": statistics.mean(tokens) if tokens else None, "total_generated": sum(tokens),
                   "prompt_tokens_mean": statistics.mean([r["prompt_tokens"] or 0 for r in records]) if records
                   else None,
                   "cached_tokens_mean": statistics.mean([r["cached_tokens"] or 0 for r in records]) if records
                   else None},
    }


def mode_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """One mode's summary, overall and per prompt set, plus its memory."""
    records = run["records"]
    by_set = {s: summarize([r for r in records if r["set"] == s]) for s in dict.fromkeys(r["set"] for r in records)}
    return {**summarize(records), "memory": {"peak_rss_mb": run["peak_rss_mb"]}, "by_set": by_set}


def _change(new: float | None, old: float | None, lower_is_better: bool = False) -> float | None:
    if new is None or old is None or not old:
        return None
    return (1 - new / old) * 100 if lower_is_better else (new / old - 1) * 100


def improvements(baseline: dict[str, Any], inferos: dict[str, Any]) -> dict[str, Any]:
    """The document's improvement percentages (TPS up, latency and first-token latency down, memory down),
    the quality change, and the TTFT ratio the targets use."""
    def get(m: dict[str, Any], *keys: str) -> float | None:
        for key in keys:
            m = m.get(key) if isinstance(m, dict) else None
        return m

    out = {"tps_improvement": _change(get(inferos, "throughput", "tokens_per_second"),
                                      get(baseline, "throughput", "tokens_per_second")),
           "latency_reduction": _change(get(inferos, "latency", "mean_ms"), get(baseline, "latency", "mean_ms"), True),
           "ftl_reduction": _change(get(inferos, "first_token_latency", "mean_ms"),
                                    get(baseline, "first_token_latency", "mean_ms"), True),
           "quality_change": None}
    if get(inferos, "quality", "mean_score") is not None and get(baseline, "quality", "mean_score") is not None:
        out["quality_change"] = inferos["quality"]["mean_score"] - baseline["quality"]["mean_score"]
    tps_b, tps_i = get(baseline, "throughput", "tokens_per_second"), get(inferos, "throughput", "tokens_per_second")
    ttft_b, ttft_i = get(baseline, "first_token_latency", "mean_ms"), get(inferos, "first_token_latency", "mean_ms")
    out["throughput_ratio"] = tps_i / tps_b if tps_b and tps_i is not None else None
    out["ttft_ratio"] = ttft_i / ttft_b if ttft_b and ttft_i is not None else None
    if "memory" in baseline and "memory" in inferos:
        out["memory_reduction"] = _change(inferos["memory"]["peak_rss_mb"], baseline["memory"]["peak_rss_mb"], True)
    return out


@dataclass
class Report:
    """What ``inferos bench report`` writes as JSON (and draws in the HTML)."""

    model: str
    config: dict[str, Any]
    environment: dict[str, Any]
    baseline: dict[str, Any]
    inferos: dict[str, Any]
    improvements: dict[str, Any]
    by_set: dict[str, Any]
    ablation: dict[str, Any] | None = None
    raw: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(model: str, config: ReportConfig, environment: dict[str, Any], baseline_run: dict[str, Any],
            inferos_run: dict[str, Any], ablation: dict[str, Any] | None = None) -> Report:
    baseline, inferos = mode_metrics(baseline_run), mode_metrics(inferos_run)
    by_set = {s: improvements(baseline["by_set"][s], inferos["by_set"][s])
              for s in baseline["by_set"] if s in inferos["by_set"]}
    strip = lambda rs: [{k: v for k, v in r.items() if k != "messages"} for r in rs]  # noqa: E731
    return Report(model, {**asdict(config), "generation": config.generation}, environment, baseline, inferos,
                  improvements(baseline, inferos), by_set, ablation,
                  {"baseline": strip(baseline_run["records"]), "inferos": strip(inferos_run["records"])})
