"""``inferos bench shared-store``: two servers on one Valkey/Redis, and a run that loses the store midway.

Sharing: server A serves a long prompt (a system prompt with a document, ~2,000 tokens); server B, another
process with nothing of its own (no disk spill, its own home), then serves the same prompt: its TTFT against its
own cold prefill of a same-length prompt nothing can serve (the system prompt's first word changed), and against
A's cold TTFT. Outage: 8 chats x 6 turns round-robin against one server; the store is killed after the second
round; every request must complete, and the metrics show the outage.

The store is a ``redis-server`` this command starts on a free loopback port (Debian's package speaks the protocol
Valkey speaks), or ``--store URL`` for one you run (the outage part then needs the spawned one).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from lemonade_inferos.bench.multiturn import stream_turn
from lemonade_inferos.bench.servers import free_port, running_server


@contextlib.contextmanager
def spawned_store(maxmemory: str = "512mb") -> Iterator[tuple[str, subprocess.Popen]]:
    """A ``redis-server`` on a free loopback port, no persistence, LRU eviction."""
    import redis

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise RuntimeError("neither redis-server nor valkey-server is installed (apt-get install redis-server), "
                           "or pass --store URL")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy",
                                    "allkeys-lru", "--dir", folder], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.05)
            yield f"valkey://127.0.0.1:{port}/0", process
        finally:
            process.kill()
            process.wait()


def _metric(base: str, name: str) -> float | None:
    found = re.search(rf"(?m)^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", httpx.get(f"{base}/metrics").text)
    return float(found.group(1)) if found else None


def _drained(base: str, timeout_s: float = 60) -> None:
    """Wait until the server's write-through queue to the store is sent (the writes counter holds still)."""
    last, deadline = -1.0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _metric(base, "inferos_shared_store_writes_total") or 0.0
        if now > 0 and now == last:
            return
        last = now
        time.sleep(0.5)


def _server(url: str, home: Path, log: Path, ctx: str = "8192"):
    return running_server("--ctx-size", ctx, "--plugin", "inferos", "--inferos-prefix-spill-mb", "0",
                          "--inferos-prefix-store", url, env={"INFEROS_HOME": str(home)}, log_path=log)


def _home(model_dir: Path, root: Path) -> Path:
    """An INFEROS_HOME of its own whose built model is ``model_dir`` (symlinked): no spill, no shared memory."""
    home = root
    (home / "models").mkdir(parents=True, exist_ok=True)
    target = home / "models" / model_dir.name
    if not target.exists():
        shutil.copytree(model_dir, target, copy_function=os.symlink)
    calibration = model_dir.parent.parent / "calibration"
    if calibration.is_dir() and not (home / "calibration").exists():
        shutil.copytree(calibration, home / "calibration")
    return home


def sharing(model: str, model_dir: Path, url: str, log_dir: Path, prompt_chars: int) -> dict[str, Any]:
    from lemonade_inferos.corpus import corpus_text

    document = corpus_text()[:prompt_chars]
    messages = [{"role": "system", "content": "Answer from the document.\n" + document},
                {"role": "user", "content": "Summarize the document in one sentence."}]
    cold_messages = [dict(messages[0], content="Hi. " + messages[0]["content"])] + messages[1:]
    warm_up = [{"role": "user", "content": "warm up"}]
    root = Path(tempfile.mkdtemp(prefix="inferos-shared-"))
    with _server(url, _home(model_dir, root / "a"), log_dir / "shared-a.log") as first:
        stream_turn(first, model, warm_up, 2)
        a = stream_turn(first, model, messages, 8)
        _drained(first)
        written = _metric(first, "inferos_shared_store_writes_total")
    with _server(url, _home(model_dir, root / "b"), log_dir / "shared-b.log") as second:
        stream_turn(second, model, warm_up, 2)
        b = stream_turn(second, model, messages, 8)
        b_cold = stream_turn(second, model, cold_messages, 8)
        shared_blocks = _metric(second, 'inferos_prefix_hit_blocks_total{tier="shared"}')
        latency_sum = _metric(second, "inferos_shared_store_latency_seconds_sum")
        latency_count = _metric(second, "inferos_shared_store_latency_seconds_count")
    shutil.rmtree(root, ignore_errors=True)
    return {"prompt_tokens": a["prompt_tokens"], "a_cold_ttft_s": a["ttft_s"], "blocks_written": written,
            "b_ttft_s": b["ttft_s"], "b_cached_tokens": b["cached_tokens"], "b_cold_ttft_s": b_cold["ttft_s"],
            "b_ttft_vs_its_cold": b["ttft_s"] / b_cold["ttft_s"], "b_ttft_vs_a_cold": b["ttft_s"] / a["ttft_s"],
            "b_blocks_from_store": shared_blocks, "same_reply": a["text"] == b["text"],
            "store_round_trip_ms_mean": 1000 * latency_sum / latency_count if latency_count else None}


def outage(model: str, model_dir: Path, url: str, store: subprocess.Popen, log_dir: Path, chats: int = 8,
           turns: int = 6, kill_after: int = 2) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="inferos-outage-"))
    conversations = [[{"role": "system", "content": f"You are assistant number {i}. Answer in one sentence. " * 6}]
                     for i in range(chats)]
    completed = failed = 0
    with _server(url, _home(model_dir, root), log_dir / "shared-outage.log") as base:
        for turn in range(turns):
            if turn == kill_after:
                store.kill()
                store.wait()
            for chat in conversations:
                chat.append({"role": "user", "content": f"Turn {turn + 1}: name one Python builtin."})
                try:
                    reply = stream_turn(base, model, chat, 12)
                    completed += 1
                    chat.append({"role": "assistant", "content": reply["text"]})
                except httpx.HTTPError:
                    failed += 1
                    chat.pop()
        metrics = {name: _metric(base, f"inferos_shared_store_{name}") for name in
                   ("up", "errors_total", "dropped_writes_total", "writes_total", "hits_total")}
    shutil.rmtree(root, ignore_errors=True)
    return {"requests": chats * turns, "completed": completed, "failed": failed, "store_killed_after_round": kill_after,
            "metrics": metrics}


def run_shared_store_bench(model: str, model_dir: Path, log_dir: Path, store_url: str | None = None,
                           prompt_chars: int = 7500) -> dict[str, Any]:
    results: dict[str, Any] = {"model": model}
    if store_url is not None:
        results["sharing"] = sharing(model, model_dir, store_url, log_dir, prompt_chars)
        return results
    with spawned_store() as (url, _):
        results["sharing"] = sharing(model, model_dir, url, log_dir, prompt_chars)
    with spawned_store() as (url, process):
        results["outage"] = outage(model, model_dir, url, process, log_dir)
    return results
