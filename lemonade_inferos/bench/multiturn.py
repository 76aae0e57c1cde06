"""``inferos bench multiturn``: a scripted 10-turn chat against the host, with the plugin and without.

Two real servers run in the same invocation: ``--plugin inferos`` and the
baseline (no plugin: og.Generator, what Lemonade runs). The same conversation
(user turns cut from ``pydoc_data.topics``, <= 200 tokens each; greedy replies)
is played against both. Per turn we record client-measured TTFT (first content
chunk of the stream) and the server's usage (prompt and cached tokens).

Where llama-cpp-python is installed, llama.cpp plays the same user turns in
this process on the shipped GGUF (its own greedy replies, its own prefix reuse:
its KV cache keeps the longest common prefix), timed without HTTP.

Cold prefill: after the last turn, its prompt is sent once more with
``cache_prompt: false`` (llama.cpp's field), so nothing is reused: the same
prompt, prefilled from scratch under the same KV plan.

Restore fidelity: in-process, the last turn's prompt is prefilled cold under the
plugin's KV plan and, separately, restored from a prefix store holding the
previous turn and continued from the previous turn's live cache (the warm
path); the KL divergences of the first-token distributions are reported
(target <= 1e-3).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from lemonade_inferos.reports import write_json
from lemonade_inferos.bench.servers import running_server

SYSTEM = ("You are a helpful assistant for Python programmers. Answer briefly, with one or two sentences, and "
          "quote the documentation when it helps.")


def user_turns(tokenizer: Any, num_turns: int, max_tokens: int = 180) -> list[str]:
    """User messages cut from pydoc topics, each at most ``max_tokens`` tokens."""
    from pydoc_data.topics import topics
    turns = []
    for name in sorted(topics)[5:5 + num_turns]:
        ids = tokenizer.encode(topics[name])[:max_tokens - 12]
        turns.append("Explain this part of the docs:\n" + tokenizer.decode(ids))
    return turns


def timed_stream(url: str, body: dict[str, Any], text_of: Callable[[dict[str, Any]], str | None],
                 client: httpx.Client | None = None) -> dict[str, Any]:
    """POST a streamed (SSE) request, timed at the client: TTFT at the first chunk ``text_of`` finds text in,
    latency at the stream's end; the reply's text and the server's usage.

    ``client``: one built before (the ``openai`` SDK builds one per process). The clock starts once a client
    exists: building one loads a CA bundle (~22 ms here), which no server's time should carry."""
    client = client if client is not None else httpx.Client(timeout=600)
    started, first, parts, usage = time.perf_counter(), None, [], {}
    with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text = text_of(chunk) if chunk.get("choices") else None
            if text is not None and first is None:
                first = time.perf_counter()
            parts.append(text or "")
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    return {"ttft_s": (first or ended) - started, "latency_s": ended - started, "text": "".join(parts),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "server_ttft_s": usage.get("prefill_duration_ttft")}


def stream_turn(base: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                **extra: Any) -> dict[str, Any]:
    """One streamed chat request (greedy unless ``extra`` says otherwise), timed by :func:`timed_stream`."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **extra}
    return timed_stream(f"{base}/api/v1/chat/completions", body, lambda c: c["choices"][0]["delta"].get("content"))


def play(base: str, model: str, turns: list[str], reply_tokens: int) -> tuple[list[dict[str, Any]], list[dict]]:
    messages = [{"role": "system", "content": SYSTEM}]
    records = []
    for index, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        record = stream_turn(base, model, messages, reply_tokens)
        record["turn"] = index + 1
        records.append(record)
        messages.append({"role": "assistant", "content": record["text"]})
    return records, messages[:-1]


def cold_ttft(base: str, model: str, messages: list[dict[str, str]], reply_tokens: int) -> float:
    """TTFT of the last prompt prefilled from scratch (``cache_prompt: false``: with segment reuse, a prompt whose
    first word changed would still find the rest shifted in the warm cache)."""
    return stream_turn(base, model, messages, reply_tokens, cache_prompt=False)["ttft_s"]


def restore_kld(model_dir: Path, messages: list[dict[str, str]], kv_mode: str = "dynamic") -> dict[str, float]:
    """KL(cold || restored) of the first-token distribution of the last turn, same KV plan, in-process.

    Restored from the prefix store (INT8 at rest) and from the previous turn's live cache (the warm path).
    """
    from lemonade_inferos.controller.controller import Controller
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.eval.scoring import log_softmax
    from lemonade_inferos.kvcache.manager import TieredKVCache
    from lemonade_inferos.kvcache.prefix_store import PrefixStore
    from lemonade_inferos.kvcache.rope import RopeTables

    controller = Controller()
    controller.update_policy({"kv": {"mode": kv_mode}})
    engine = OrtEngine(model_dir, controller.session_policy())  # the plugin's engine: probe graph included
    plan = controller.kv_plan()
    rope = RopeTables.from_onnx(engine.folder.onnx_path)
    template = engine.tokenizer.apply_chat_template
    prompt = engine.tokenizer.encode(template(messages))
    previous = engine.tokenizer.encode(template(messages[:-2]))  # the conversation before the last exchange

    def first_token_logprobs(cache: TieredKVCache, ids: list[int]) -> np.ndarray:
        logits = None
        for start in range(cache.num_tokens, len(ids), engine.prefill_chunk_tokens):
            logits = engine.forward(ids[start:start + engine.prefill_chunk_tokens], cache)[-1]
        return log_softmax(logits)

    cold = first_token_logprobs(TieredKVCache(engine.layout_for(plan), plan, rope), prompt)
    store, salt = PrefixStore(2**30), PrefixStore.salt(engine.folder.fingerprint, "bench")
    parked = TieredKVCache(engine.layout_for(plan), plan, rope)
    first_token_logprobs(parked, previous)
    store.park(parked, salt)
    restored_cache = TieredKVCache(engine.layout_for(plan), plan, rope)
    restored_tokens = store.restore(restored_cache, store.lookup(prompt, salt))
    restored = first_token_logprobs(restored_cache, prompt)
    kld = float((np.exp(cold) * (cold - restored)).sum())
    # the warm path: the previous turn's live cache itself, continued with the rest of the prompt
    warm_tokens = parked.num_tokens
    warm = first_token_logprobs(parked, prompt)
    return {"kld": kld, "restored_tokens": restored_tokens, "prompt_tokens": len(prompt),
            "same_top1": bool(cold.argmax() == restored.argmax()),
            "warm_kld": float((np.exp(cold) * (cold - warm)).sum()), "warm_tokens": warm_tokens,
            "warm_same_top1": bool(cold.argmax() == warm.argmax())}


def hit_rates(records: list[dict[str, Any]]) -> dict[str, float]:
    """Cached prompt tokens over the reusable ones (what was processed for the previous turn: its prompt and its
    reply), and over all prompt tokens, for turns 2..N."""
    later = records[1:]
    cached = sum(r["cached_tokens"] or 0 for r in later)
    reusable = sum(min(r["prompt_tokens"], p["prompt_tokens"] + p["completion_tokens"])
                   for p, r in zip(records, later))
    return {"hit_rate": cached / reusable, "hit_rate_of_all_prompt_tokens": cached / sum(r["prompt_tokens"]
                                                                                         for r in later)}


def run_multiturn_bench(model_name: str, model_dir: Path, num_turns: int, reply_tokens: int,
                        log_dir: Path, gguf: Path | None = None) -> dict[str, Any]:
    from lemonade_inferos.engine.sampling import SamplingParams
    from lemonade_inferos.engine.tokenizer import ChatTokenizer

    turns = user_turns(ChatTokenizer.from_folder(model_dir), num_turns)
    results: dict[str, Any] = {"model": model_name, "turns": num_turns, "reply_tokens": reply_tokens}
    # no disk spill: blocks a previous run left on disk would turn the cold prefill into a hit
    for mode, args in (("inferos", ("--plugin", "inferos", "--inferos-prefix-spill-mb", "0")), ("baseline", ())):
        with running_server("--ctx-size", "8192", *args, log_path=log_dir / f"multiturn-{mode}.log") as base:
            stream_turn(base, model_name, [{"role": "user", "content": "warm up"}], 2)
            records, messages = play(base, model_name, turns, reply_tokens)
            cold = cold_ttft(base, model_name, messages + [{"role": "assistant", "content": records[-1]["text"]}][:-1],
                             reply_tokens)
        results[mode] = {
            "per_turn": records, "cold_ttft_s": cold, "last_turn_ttft_s": records[-1]["ttft_s"],
            "last_turn_ttft_vs_cold": records[-1]["ttft_s"] / cold, **hit_rates(records),
            "history_tokens": records[-1]["prompt_tokens"],
        }
    if gguf is not None:  # llama.cpp in process, its own replies and prefix reuse (no HTTP in its timings)
        from lemonade_inferos.bench.llamacpp import LlamaCppEngine, play_multiturn

        tokenizer = ChatTokenizer.from_folder(model_dir)
        engine = LlamaCppEngine(gguf, context_length=8192)
        warm_up = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}]))
        list(engine.generate(warm_up, SamplingParams(max_tokens=2)))
        results["llama.cpp"] = play_multiturn(engine, tokenizer, SYSTEM, turns, reply_tokens)
        results["llama.cpp"].update(hit_rates(results["llama.cpp"]["per_turn"]))
        results["llama.cpp"]["gguf"] = str(gguf)
        del engine
    results["restore"] = restore_kld(model_dir, messages)
    results["ttft_speedup_last_turn"] = results["baseline"]["last_turn_ttft_s"] / results["inferos"]["last_turn_ttft_s"]
    results["last_turn_ttft_vs_baseline_cold"] = results["inferos"]["last_turn_ttft_s"] / results["baseline"]["cold_ttft_s"]
    return results


def plot_multiturn(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = {"baseline": "og.Generator (no plugin)", "inferos": "--plugin inferos",
              "llama.cpp": "llama.cpp, in process (GGUF Q4_1)"}
    for mode, color in (("baseline", "#999999"), ("inferos", "#2a7ab9"), ("llama.cpp", "#d98c2b")):
        if mode not in results:
            continue
        turns = [r["turn"] for r in results[mode]["per_turn"]]
        ax.plot(turns, [r["ttft_s"] for r in results[mode]["per_turn"]], marker="o", color=color, label=labels[mode])
        ax.axhline(results[mode]["cold_ttft_s"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT (s): HTTP client; llama.cpp in process")
    ax.set_title(f"{results['model']}: {results['turns']} turns, history {results['inferos']['history_tokens']} tokens; "
                 f"inferos hit rate {results['inferos']['hit_rate']:.1%}; dotted: cold prefill",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_multiturn(model_name: str, model_dir: Path, num_turns: int, reply_tokens: int,
                    json_path: Path, gguf: Path | None = None) -> dict[str, Any]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = run_multiturn_bench(model_name, model_dir, num_turns, reply_tokens, json_path.parent, gguf)
    write_json(json_path, results)
    plot_multiturn(results, json_path.with_suffix(".png"))
    return results
