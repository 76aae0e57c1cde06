"""What ``inferos bench peers`` asks of each server: the workloads Lemonade's CPU users run, over HTTP.

Every workload talks to ``/v1/chat/completions`` (both servers serve it), streams, is greedy, and is timed at
the client (:func:`~lemonade_inferos.bench.multiturn.timed_stream`), so both servers are measured alike. Each
returns its metrics; ``HEADLINE`` names the one the comparison is made on and whether lower is better.
"""

from __future__ import annotations

import inspect
import statistics
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from lemonade_inferos.bench.multiturn import timed_stream
from lemonade_inferos.bench.sliding import SYSTEM as GAIA_SYSTEM

CHAT_SYSTEM = "You are a helpful assistant for Python programmers. Answer briefly."


@dataclass(frozen=True)
class PeerPrompts:
    """The texts every server gets, cut by token count with the model's tokenizer (the GGUF's vocabulary)."""

    decode: str          # ~512 tokens of prose: decode after a mid-size prompt
    cold: str            # ~2,048 tokens: a long prompt prefilled from scratch
    long: str            # ~6,900 tokens: what one long request adds to a server's memory
    turns: list[str]     # user turns of <= 180 tokens (the 10-turn chat, GAIA's sliding window)
    code: str            # a Python module to edit (copy-heavy output)

    @classmethod
    def build(cls, tokenizer: Any) -> "PeerPrompts":
        from lemonade_inferos.bench.multiturn import user_turns
        from lemonade_inferos.corpus import corpus_text

        def cut(text: str, tokens: int) -> str:
            return tokenizer.decode(tokenizer.encode(text[: tokens * 8])[:tokens])

        text = corpus_text()
        return cls(decode=cut(text, 480), cold=cut(text[len(text) // 2:], 2000),
                   long=cut(text[len(text) // 4:], 6880), turns=user_turns(tokenizer, 12),
                   code=cut(inspect.getsource(textwrap), 700))


class Chat:
    """One server's chat endpoint, as both servers serve it."""

    def __init__(self, base: str, model: str) -> None:
        self.url, self.model = f"{base}/v1/chat/completions", model
        # built once, outside every timing (building one loads a CA bundle, ~22 ms); a connection per request,
        # as llama-server (cpp-httplib) closes kept-alive ones after a few requests
        self.client = httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))

    def __call__(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **extra}
        return timed_stream(self.url, body, lambda c: c["choices"][0]["delta"].get("content"), self.client)

    def close(self) -> None:
        self.client.close()


def _decode_tps(record: dict[str, Any]) -> float | None:
    tokens, seconds = record["completion_tokens"], record["latency_s"] - record["ttft_s"]
    return (tokens - 1) / seconds if tokens and tokens > 1 and seconds > 0 else None


def decode(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """A ~512-token prompt, then 128 tokens (``ignore_eos``: every server decodes all of them)."""
    record = chat([{"role": "user", "content": prompts.decode}], 128, ignore_eos=True)
    return {"decode_tps": _decode_tps(record), "ttft_s": record["ttft_s"],
            "completion_tokens": record["completion_tokens"], "prompt_tokens": record["prompt_tokens"]}


def cold_prefill(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """A ~2K-token prompt the server has never seen: time to first token."""
    record = chat([{"role": "user", "content": prompts.cold}], 16)
    return {"ttft_s": record["ttft_s"], "prompt_tokens": record["prompt_tokens"]}


def long_prompt(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """A ~6,900-token prompt: what one long request costs in time and in memory (the growth of the server's RSS
    over what it held before, against the FP16 KV of the prompt, is added by the summary)."""
    record = chat([{"role": "user", "content": prompts.long}], 16)
    return {"ttft_s": record["ttft_s"], "prompt_tokens": record["prompt_tokens"]}


def _play(chat: Chat, system: str, turns: list[str], reply_tokens: int, window: int | None = None
          ) -> list[dict[str, Any]]:
    """A chat of ``turns`` with the server's own greedy replies; with ``window``, GAIA's agent pattern: the system
    prompt and the last ``window`` exchanges only."""
    exchanges: list[tuple[str, str]] = []
    records = []
    for user in turns:
        kept = exchanges if window is None else exchanges[-window:]
        messages = [{"role": "system", "content": system}]
        for question, answer in kept:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        record = chat(messages + [{"role": "user", "content": user}], reply_tokens)
        record["sliding"] = window is not None and len(exchanges) > window
        records.append(record)
        exchanges.append((user, record["text"]))
    return records


def chat_10(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """A 10-turn chat (64-token replies): the last turn's TTFT is what the history costs. Each server's history
    holds its own replies, so where two servers' greedy replies part (random weights: flat distributions), their last
    turns carry different numbers of new tokens: ``last_new_tokens`` (the prompt less what the server reused) says
    how many each prefilled."""
    records = _play(chat, CHAT_SYSTEM, prompts.turns[:10], 64)
    last = records[-1]
    new = (last["prompt_tokens"] - last["cached_tokens"]
           if last["cached_tokens"] is not None and last["prompt_tokens"] is not None else None)
    return {"last_ttft_s": last["ttft_s"], "mean_ttft_s": statistics.mean(r["ttft_s"] for r in records),
            "last_prompt_tokens": last["prompt_tokens"], "last_new_tokens": new}


def sliding_window(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """GAIA's agent: its long system prompt and the last 3 exchanges, 12 turns; the prefix breaks after the system
    prompt every turn past the 3rd."""
    records = _play(chat, GAIA_SYSTEM, prompts.turns[:12], 48, window=3)
    sliding = [r["ttft_s"] for r in records if r["sliding"]]
    return {"mean_sliding_ttft_s": statistics.mean(sliding), "sliding_turns": len(sliding)}


def concurrent_4(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """Four clients at once, each a 3-turn chat of its own: mean TTFT and the wall time for all of them."""
    records, wall = _clients(chat, prompts, 4, 3, 48, labelled=False)
    tokens = sum(r["completion_tokens"] or 0 for r in records)
    return {"mean_ttft_s": statistics.mean(r["ttft_s"] for r in records), "wall_s": wall,
            "total_tps": tokens / wall}


def _clients(chat: Chat, prompts: PeerPrompts, count: int, turns: int, reply_tokens: int, labelled: bool = True
             ) -> tuple[list[dict[str, Any]], float]:
    """``count`` clients at once, each a chat of its own (``turns`` turns) under the same system prompt; every
    request's record, and the wall time for all of them. ``labelled``: each client's first turn names the client,
    so no two conversations are the same where the turns repeat."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    errors: list[BaseException] = []

    def client(index: int) -> None:
        asks = [prompts.turns[(index * turns + k) % len(prompts.turns)] for k in range(turns)]
        if labelled:
            asks[0] = f"(client {index + 1}) {asks[0]}"
        try:
            results[index] = _play(chat, CHAT_SYSTEM, asks, reply_tokens)
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for chat_records in results for r in chat_records], time.perf_counter() - started


def _percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile, interpolated between the nearest ranks (a few requests per run)."""
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def clients(count: int) -> "Workload":
    def workload(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
        records, wall = _clients(chat, prompts, count, 4, 96)
        ttfts, latencies = [r["ttft_s"] for r in records], [r["latency_s"] for r in records]
        tokens = sum(r["completion_tokens"] or 0 for r in records)
        return {"ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p95_s": _percentile(ttfts, 0.95),
                "latency_p50_s": _percentile(latencies, 0.5), "latency_p95_s": _percentile(latencies, 0.95),
                "total_tps": tokens / wall, "wall_s": wall, "requests": len(records)}

    workload.__doc__ = (f"{count} client(s) at once, each a 4-turn chat of ~180-token turns and 96-token replies "
                        "under one system prompt: TTFT and request latency p50/p95, aggregate tok/s")
    return workload


def code_edit(chat: Chat, prompts: PeerPrompts) -> dict[str, Any]:
    """Copy-heavy output: return a ~700-token module with one name changed (n-gram drafting's best case)."""
    ask = ("Rename the class `TextWrapper` to `LineWrapper` in this module and return the whole module, "
           "unchanged otherwise:\n\n" + prompts.code)
    record = chat([{"role": "user", "content": ask}], 384)
    return {"latency_s": record["latency_s"], "decode_tps": _decode_tps(record),
            "completion_tokens": record["completion_tokens"]}


Workload = Callable[[Chat, PeerPrompts], dict[str, Any]]
CLIENT_COUNTS = (1, 2, 4, 8)   # the clients_N workloads (``inferos bench concurrency``)
WORKLOADS: dict[str, Workload] = {
    "decode": decode, "decode_spec": decode, "cold_2k": cold_prefill, "chat_10": chat_10,
    "sliding": sliding_window, "concurrent_4": concurrent_4, "code_edit": code_edit, "long_7k": long_prompt,
    **{f"clients_{n}": clients(n) for n in CLIENT_COUNTS},
}
PEER_WORKLOADS = tuple(w for w in WORKLOADS if not w.startswith("clients_"))   # bench peers' default
# workloads that need a longer context than --ctx-size gives (both servers get it)
CONTEXT: dict[str, int] = {"long_7k": 8192}
# the metric each workload is compared on, and whether lower is better
HEADLINE: dict[str, tuple[str, bool]] = {
    "decode": ("decode_tps", False), "decode_spec": ("decode_tps", False), "cold_2k": ("ttft_s", True),
    "chat_10": ("last_ttft_s", True), "sliding": ("mean_sliding_ttft_s", True), "concurrent_4": ("mean_ttft_s", True),
    "code_edit": ("latency_s", True), "long_7k": ("ttft_s", True),
    **{f"clients_{n}": ("ttft_p95_s", True) for n in CLIENT_COUNTS},
}
