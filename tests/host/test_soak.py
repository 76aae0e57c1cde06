"""Soak: 8 concurrent chats x 10 turns through the inferos plugin, with clients hanging up, bad requests and a
corrupted prefix-store file mixed in. Every good request must be answered correctly, and nothing may be left on
the baseline engine afterwards.

The prefix store is kept small (2 MiB in memory, so blocks keep spilling to disk and coming back) and warm
caches off, so the eight interleaved conversations are served from the store and its disk files: corrupting
those files mid-run hits live conversations.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading

import httpx

from lemonade_inferos.engine.tokenizer import ChatTokenizer

from ..conftest import control_url
from .conftest import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"
CHATS, TURNS, REPLY_TOKENS = 8, 10, 12
TOPICS = ["lighthouses", "rivers", "volcanoes", "bees", "trains", "glaciers", "owls", "deserts"]
BAD_REQUESTS = [  # each must be a 4xx and change nothing for anyone
    {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": []}, {"n": 2}, {"temperature": 7},
    {"max_tokens": -1}, {"stop": ["a", "b", "c", "d", "e"]}, {"model": "no-such-model"},
    {"messages": [{"role": "user", "content": "a paste far over the context " * 100_000}]},  # 3 MB
]


def _chat(base: str, chat: int, tokenizer: ChatTokenizer, rng: random.Random, corrupt_at: threading.Barrier,
          spill_dir, problems: list[str]) -> int:
    system = f"You are a patient teacher who explains {TOPICS[chat]} to children. " * 6
    messages = [{"role": "system", "content": system}]
    answered = 0
    with httpx.Client(base_url=f"{base}/api/v1", timeout=120) as client:
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Tell me fact number {turn + 1} about {TOPICS[chat]}."})
            body = {"model": MODEL, "messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0}
            roll = rng.random()
            if roll < 0.15:  # hang up on a streamed reply after its first chunk
                with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as stream:
                    next(stream.iter_lines())
            elif roll < 0.25:  # give up on a non-streaming reply almost at once
                try:
                    client.post("/chat/completions", json={**body, "max_tokens": 2000, "ignore_eos": True},
                                timeout=0.3)
                except httpx.TimeoutException:
                    pass
            elif roll < 0.4:
                bad = client.post("/chat/completions", json={**body, **rng.choice(BAD_REQUESTS)})
                if not 400 <= bad.status_code < 500:
                    problems.append(f"chat {chat} turn {turn}: a bad request got {bad.status_code}")
            if turn == TURNS // 2:
                corrupt_at.wait(timeout=300)
                if chat == 0:
                    for path in spill_dir.glob("*.npz"):  # every block on disk now: torn in half
                        with path.open("r+b") as fh:
                            fh.truncate(max(1, path.stat().st_size // 2))
                corrupt_at.wait(timeout=300)
            reply = client.post("/chat/completions", json=body)
            if reply.status_code != 200:
                problems.append(f"chat {chat} turn {turn}: HTTP {reply.status_code} {reply.text[:200]}")
                continue
            data = reply.json()
            text = data["choices"][0]["message"]["content"]
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            usage = data["usage"]
            if (not text.strip() or usage["prompt_tokens"] != len(prompt)
                    or not 0 < usage["completion_tokens"] <= REPLY_TOKENS
                    or data["choices"][0]["finish_reason"] not in ("stop", "length")):
                problems.append(f"chat {chat} turn {turn}: wrong answer {data}")
            messages.append({"role": "assistant", "content": text})
            answered += 1
    return answered


def test_eight_chats_with_disconnects_bad_requests_and_a_corrupt_store_are_all_answered(isolated_home, model_dir):
    env = {"INFEROS_HOME": str(isolated_home)}
    tokenizer = ChatTokenizer.from_folder(model_dir)
    barrier = threading.Barrier(CHATS)
    problems: list[str] = []
    with running_server("--plugin", "inferos", "--max-queue", "16", "--inferos-prefix-cache-mb", "2",
                        "--inferos-warm-caches", "0", env=env) as base:
        with concurrent.futures.ThreadPoolExecutor(CHATS) as pool:
            answered = list(pool.map(lambda c: _chat(base, c, tokenizer, random.Random(c), barrier,
                                                     isolated_home / "prefix-cache", problems), range(CHATS)))
        assert problems == []
        assert answered == [TURNS] * CHATS
        metrics = httpx.get(f"{control_url(base)}/metrics").json()
        status = metrics["optimization_status"]
        assert not status["baseline_mode"] and status["fallbacks"]["consecutive_backend_errors"] == 0
        assert metrics["prefix_cache"]["spill"]["corrupt_files"] >= 1  # the torn files were met, and set aside
        assert metrics["totals"]["cancelled"] >= 1
        final = httpx.post(f"{base}/api/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi!"}]})
        assert final.status_code == 200
        assert httpx.get(f"{base}/api/v1/stats").json()["inferos"]["engine"] == "inferos"
