"""Workloads ``inferos ab`` and ``inferos tune`` replay: a prompt set of ``inferos bench report`` by name, or a
JSON-lines file of requests a server recorded with ``--inferos-record FILE``.

A recorded line is what the plugin saw of one generate call (``InferenceContext``): the prompt's token ids after
the chat template, ``max_tokens`` and the sampling. It replays through ``/api/v1/completions`` with the ids as an
OpenAI token-array prompt, so the model sees exactly the recorded prompt, template and tools included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from lemonade_inferos.bench.prompt_sets import GENERATION, SETS, prompt_items
from lemonade_inferos.bench.multiturn import timed_stream
from lemonade_inferos.bench.report import ReportConfig, play_item
from lemonade_inferos.errors import InferosError

Progress = Callable[[int], None]


class WorkloadError(InferosError):
    code = "invalid_workload"


@dataclass(frozen=True)
class Workload:
    """Either prompt sets (played as chats) or recorded requests (replayed as token-id completions)."""

    name: str
    sets: tuple[str, ...] = ()
    recorded: tuple[dict[str, Any], ...] = ()
    config: ReportConfig = ReportConfig(warmup=0, runs=1)

    def requests(self) -> int:
        return len(self.recorded) if self.recorded else self.config.requests(self.sets)


# the prompt-set workloads by name ("chat": the document's conversation and reasoning prompts)
NAMED = {"chat": ("conversation", "reasoning"), **{s: (s,) for s in SETS}}


def load_workload(spec: str, max_tokens: int = 64) -> Workload:
    """``spec``: a name (chat, conversation, reasoning, agent, rag) or a recorded JSONL file."""
    config = ReportConfig(warmup=0, runs=1, max_tokens=max_tokens, agent_turns=3)
    if spec in NAMED:
        return Workload(spec, NAMED[spec], config=config)
    path = Path(spec)
    if not path.is_file():
        raise WorkloadError(f"workload {spec!r} is neither a prompt set ({', '.join(NAMED)}) nor a file")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            ids = line["prompt_ids"]
            if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError("prompt_ids must be a non-empty list of token ids")
            lines.append({"prompt_ids": ids, "max_tokens": int(line.get("max_tokens") or max_tokens),
                          "sampling": dict(line.get("sampling") or {})})
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkloadError(f"{path}:{number}: not a recorded request ({exc})") from exc
    if not lines:
        raise WorkloadError(f"{path} holds no requests")
    return Workload(path.name, recorded=tuple(lines), config=config)


def stream_completion(base: str, model: str, request: dict[str, Any]) -> dict[str, Any]:
    """Replay one recorded request (streamed, timed at the client as the report times chats)."""
    sampling = {k: v for k, v in request["sampling"].items() if v not in (None, [], ())}
    if "repetition_penalty" in sampling:
        sampling["repeat_penalty"] = sampling.pop("repetition_penalty")
    body = {"model": model, "prompt": request["prompt_ids"], "max_tokens": request["max_tokens"], "stream": True,
            **sampling}
    record = timed_stream(f"{base}/api/v1/completions", body, lambda c: c["choices"][0].get("text") or None)
    return {**record, "set": "recorded"}


def replay(base: str, model: str, workload: Workload, progress: Progress = lambda n: None) -> list[dict[str, Any]]:
    """Play the workload once against the server; one timed record per request."""
    if workload.recorded:
        records = []
        for request in workload.recorded:
            records.append(stream_completion(base, model, request))
            progress(1)
        return records
    config = workload.config
    records = []
    for set_name in workload.sets:
        for index in range(config.prompts(set_name)):
            item = prompt_items(set_name, index, 0, config.agent_turns)
            records += play_item(base, model, item, {**GENERATION, "max_tokens": config.max_tokens},
                                 progress=progress)
    return records
