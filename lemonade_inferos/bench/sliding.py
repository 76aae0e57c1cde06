"""``inferos bench multiturn --sliding-window K``: GAIA's agent pattern, a system prompt plus the last K exchanges.

Every turn past the K-th drops the oldest exchange right after the system prompt, so the prompt's prefix breaks
there. The same scripted chat (user turns cut from ``pydoc_data.topics``, greedy replies) is played against
``lemonade-server --plugin inferos`` twice in one run: with segment reuse (the default) and with
``kv.segment_reuse`` off (prefix reuse only: the system prompt). Per turn: client TTFT, prompt and cached tokens.

Cold prefill: after the chat, each sliding turn's prompt is sent again with ``cache_prompt: false`` (llama.cpp's
field: prefilled from scratch, nothing reused), on the same server.

Quality, in process under the server's KV plan: for each sliding turn, the previous turn's sequence (its prompt
and reply) is run into a cache that is kept warm, the turn's prompt is served from it by segment reuse, and
compared with a cold prefill of the same prompt: first-token KLD and top-1, and the greedy reply (agreement:
the share of reply tokens identical before the first difference, and whether the replies are identical).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lemonade_inferos.bench.multiturn import stream_turn, user_turns
from lemonade_inferos.bench.servers import running_server

SYSTEM = ("You are GAIA, a local assistant on an AI PC. You answer questions about Python from its documentation. "
          "Rules: answer in one or two sentences; quote the documentation when it helps; say when you do not know; "
          "never invent an API; prefer the standard library; keep code short; use plain words. ") * 4


def _messages(exchanges: list[tuple[str, str]], user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in exchanges:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user}]


def play_sliding(base: str, model: str, turns: list[str], window: int, reply_tokens: int) -> list[dict[str, Any]]:
    exchanges: list[tuple[str, str]] = []
    records = []
    for index, user in enumerate(turns):
        messages = _messages(exchanges[-window:], user)
        record = stream_turn(base, model, messages, reply_tokens)
        # sliding: the oldest exchange is dropped now, right after the system prompt (the prefix breaks there)
        record.update(turn=index + 1, sliding=len(exchanges) > window, messages=messages)
        records.append(record)
        exchanges.append((user, record["text"]))
    return records


def _cold(base: str, model: str, messages: list[dict[str, str]], reply_tokens: int) -> float:
    """The same prompt prefilled from scratch (llama.cpp's ``cache_prompt: false``: nothing reused)."""
    return stream_turn(base, model, messages, reply_tokens, cache_prompt=False)["ttft_s"]


def quality(model_dir: Path, records: list[dict[str, Any]], reply_tokens: int, share: float) -> list[dict]:
    """Segment reuse against a cold prefill, per sliding turn, in process under the server's plan."""
    from lemonade_inferos.controller.controller import Controller
    from lemonade_inferos.engine.binding import StepBinding
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.prompt_cache import take_splices
    from lemonade_inferos.engine.sampling import SamplingParams
    from lemonade_inferos.eval.scoring import log_softmax
    from lemonade_inferos.kvcache.manager import TieredKVCache
    from lemonade_inferos.kvcache.plan import TIER_INT4
    from lemonade_inferos.kvcache.prefix_store import PrefixStore
    from lemonade_inferos.kvcache.reuse import PrefixReuse
    from lemonade_inferos.kvcache.rope import RopeTables
    from lemonade_inferos.kvcache.warm import WarmCaches

    controller = Controller()
    controller.update_policy({"kv": {"segment_recompute": share}})
    engine = OrtEngine(model_dir, controller.session_policy())
    plan = controller.kv_plan()
    layout, rope = engine.layout_for(plan), RopeTables.from_onnx(engine.folder.onnx_path)
    tokenizer, salt = engine.tokenizer, PrefixStore.salt(engine.folder.fingerprint, "bench")

    def encode(messages):
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    def greedy(cache: TieredKVCache, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
        splices = take_splices(cache, prompt, cache.num_tokens)
        logits = engine.prefill(StepBinding(engine, cache), prompt[cache.num_tokens:], splices, cache.num_tokens)
        first = log_softmax(logits[None])[0]
        cache.truncate(len(prompt) - 1)  # generate() runs the last prompt token again, as for the cold cache
        tokens = [t for c in engine.generate(prompt, SamplingParams(max_tokens=reply_tokens), cache=cache)
                  for t in c.token_ids]
        return first, tokens

    rows = []
    for previous, record in zip(records, records[1:]):
        if not record["sliding"]:
            continue
        prompt = encode(record["messages"])
        earlier = TieredKVCache(layout, plan, rope)
        earlier_ids = encode(previous["messages"]) + tokenizer.encode(previous["text"])
        for start in range(0, len(earlier_ids), engine.prefill_chunk_tokens):
            engine.forward(earlier_ids[start:start + engine.prefill_chunk_tokens], earlier)
        reuse = PrefixReuse(PrefixStore(2**30), WarmCaches(1, min_tokens=32))
        reuse.release(earlier, salt, keep_warm=True)
        cache, reused = reuse.acquire(prompt, salt, layout, plan, TIER_INT4, lambda: TieredKVCache(layout, plan, rope))
        splice = cache.splices[0] if cache.splices else None
        warm_first, warm_reply = greedy(cache, prompt)
        cold_first, cold_reply = greedy(TieredKVCache(layout, plan, rope), prompt)
        same = next((i for i, (a, b) in enumerate(zip(warm_reply, cold_reply)) if a != b),
                    min(len(warm_reply), len(cold_reply)))
        rows.append({"turn": record["turn"], "prompt_tokens": len(prompt), "prefix_tokens": reused,
                     "segment_tokens": len(splice) if splice else 0,
                     "recomputed_tokens": splice.recomputed if splice else 0,
                     "kld": float((np.exp(cold_first) * (cold_first - warm_first)).sum()),
                     "same_top1": bool(cold_first.argmax() == warm_first.argmax()),
                     "reply_agreement": same / max(1, len(cold_reply)), "same_reply": warm_reply == cold_reply})
    return rows


def run_sliding_bench(model_name: str, model_dir: Path, num_turns: int, window: int, reply_tokens: int,
                      log_dir: Path, shares: tuple[float, ...] = (0.05,)) -> dict[str, Any]:
    from lemonade_inferos.engine.tokenizer import ChatTokenizer

    turns = user_turns(ChatTokenizer.from_folder(model_dir), num_turns)
    results: dict[str, Any] = {"model": model_name, "turns": num_turns, "window": window,
                               "reply_tokens": reply_tokens, "runs": {}}
    modes = [("segments", share, ("--plugin-option", f"inferos.kv.segment_recompute={share}")) for share in shares]
    modes.append(("prefix only", None, ("--plugin-option", "inferos.kv.segment_reuse=false")))
    for name, share, extra in modes:
        label = name if share is None else f"{name} {share:g}"
        with running_server("--ctx-size", "8192", "--plugin", "inferos", "--inferos-prefix-spill-mb", "0", *extra,
                            log_path=log_dir / f"sliding-{label.replace(' ', '-')}.log") as base:
            stream_turn(base, model_name, [{"role": "user", "content": "warm up"}], 2)
            records = play_sliding(base, model_name, turns, window, reply_tokens)
            sliding = [r for r in records if r["sliding"]]
            for record in sliding:
                record["cold_ttft_s"] = _cold(base, model_name, record["messages"], reply_tokens)
        ratios = [r["ttft_s"] / r["cold_ttft_s"] for r in sliding]
        run = {"share": share, "per_turn": [{k: v for k, v in r.items() if k != "messages"} for r in records],
               "sliding_turns": len(sliding), "mean_sliding_ttft_s": float(np.mean([r["ttft_s"] for r in sliding])),
               "mean_cold_ttft_s": float(np.mean([r["cold_ttft_s"] for r in sliding])),
               "mean_ttft_vs_cold": float(np.mean(ratios)),
               "mean_cached_tokens": float(np.mean([r["cached_tokens"] or 0 for r in sliding])),
               "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in sliding]))}
        if share is not None:
            rows = quality(model_dir, records, reply_tokens, share)
            run.update(quality=rows, max_kld=max(r["kld"] for r in rows), mean_kld=float(np.mean([r["kld"]
                                                                                                  for r in rows])),
                       same_top1_share=float(np.mean([r["same_top1"] for r in rows])),
                       same_reply_share=float(np.mean([r["same_reply"] for r in rows])),
                       mean_reply_agreement=float(np.mean([r["reply_agreement"] for r in rows])))
        results["runs"][label] = run
    return results


def plot_sliding(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in results["runs"].items():
        turns = [r["turn"] for r in run["per_turn"] if r["sliding"]]
        ax.plot(turns, [r["ttft_s"] for r in run["per_turn"] if r["sliding"]], marker="o", label=f"{label} TTFT")
    first = next(iter(results["runs"].values()))
    ax.plot([r["turn"] for r in first["per_turn"] if r["sliding"]],
            [r["cold_ttft_s"] for r in first["per_turn"] if r["sliding"]], "k--", label="cold prefill")
    ax.set(xlabel="turn", ylabel="TTFT (s)", title=f"sliding window {results['window']}: TTFT per turn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
