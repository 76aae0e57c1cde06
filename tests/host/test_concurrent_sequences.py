"""Many clients at once: a model serves several sequences together, their steps taking turns at ONNX Runtime and
their decode steps running as batches, so a new request's first token does not wait for other replies to end.
Greedy replies are exactly what each request gets alone; a client that goes away frees its place within a token; a
request that fails fails alone."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.host.conftest import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"
SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one or two sentences. " * 6}
QUESTIONS = ["What is a lemon?", "Why do cats purr?", "How does rain form?", "What is a prime number?"]


@pytest.fixture(scope="module")
def server(isolated_home_module, tmp_path_factory):
    # a time limit four 32-token replies at once stay well within on a loaded 2-core machine (6 s was not, with a
    # compiler on both cores), and one 6,000-token reply does not (at 200 tok/s it would take 30 s)
    with running_server("--plugin", "inferos", "--parallel", "4", "--request-timeout", "15",
                        env={"INFEROS_HOME": str(isolated_home_module)},
                        log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        yield base


def streamed(base: str, question: str, max_tokens: int, times: dict | None = None) -> str:
    """A streamed greedy reply; ``times`` gets when its first token and its end arrived."""
    parts = []
    with httpx.stream("POST", f"{base}/api/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [SYSTEM, {"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if text and times is not None:
                times.setdefault("first", time.perf_counter())
            parts.append(text or "")
    if times is not None:
        times["end"] = time.perf_counter()
    return "".join(parts)


def at_once(jobs):
    """Run every job in a thread of its own, started together; their results in order."""
    results, errors = [None] * len(jobs), []

    def run(index, job):
        try:
            results[index] = job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_chats_interleave_and_each_reply_is_exactly_its_reply_alone(server):
    alone = [streamed(server, q, 32) for q in QUESTIONS]
    times = [{} for _ in QUESTIONS]
    together = at_once([lambda q=q, t=t: streamed(server, q, 32, t) for q, t in zip(QUESTIONS, times)])
    assert together == alone
    assert max(t["first"] for t in times) < min(t["end"] for t in times), \
        "every client's first token came before any reply ended: the sequences ran together"
    health = httpx.get(f"{server}/api/v1/health", timeout=30).json()
    scheduler = health["all_models_loaded"][0]["inferos"]["scheduler"]
    assert scheduler["parallel"] == 4 and scheduler["contended_steps"] > 0
    assert scheduler["batched_runs"] > 0 and scheduler["failed_batches"] == 0, \
        "the sequences' tokens ran as batches (continuous batching), none of which failed"
    assert scheduler["session_runs"] < scheduler["steps"] and scheduler["batch_rows_bytes"] == 0, \
        "fewer runs than steps, and the batch's rows freed once the sequences ended"


def test_a_client_that_goes_away_frees_its_place_for_the_next(server):
    with httpx.stream("POST", f"{server}/api/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 2000, "stream": True, "ignore_eos": True}) as reply:
        for count, _ in enumerate(reply.iter_lines()):
            if count > 8:
                break
    deadline = time.time() + 5
    while time.time() < deadline:
        scheduler = httpx.get(f"{server}/api/v1/health", timeout=30).json()["all_models_loaded"][0]["inferos"][
            "scheduler"]
        if scheduler["running"] == 0:
            break
        time.sleep(0.05)
    assert scheduler["running"] == 0, scheduler


def test_a_request_that_fails_fails_alone(server):
    """One request runs past the time limit while another is served beside it: only the first ends in error."""
    def long_one():
        return httpx.post(f"{server}/api/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Count to ten thousand."}],
            "max_tokens": 6000, "ignore_eos": True})

    alone = streamed(server, QUESTIONS[0], 24)
    failed, beside = at_once([long_one, lambda: streamed(server, QUESTIONS[0], 24)])
    assert failed.status_code == 504 and failed.json()["error"]["code"] == "request_timeout"
    assert beside == alone


def test_a_freed_place_goes_to_the_shortest_prompt_or_the_first_come():
    import asyncio

    from lemonade_inferos.host.models import RequestGate

    async def order_of(schedule):
        gate, order = RequestGate(max_queue=8, parallel=1, order=schedule), []
        first = gate.admit(50)
        async with first.slot():
            async def wait(tokens):
                async with gate.admit(tokens).slot():
                    order.append(tokens)
            tasks = [asyncio.ensure_future(wait(tokens)) for tokens in (300, 100, 200)]
            gone = asyncio.ensure_future(wait(10))   # a waiter that gives up keeps no place
            await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert gate.running == 0 and gate.waiting == 0
        return order

    assert asyncio.run(order_of("shortest_first")) == [100, 200, 300]
    assert asyncio.run(order_of("fcfs")) == [300, 100, 200]


def test_sequences_that_ask_for_the_engine_at_once_get_the_one_engine_built_once(calibrated_model, monkeypatch):
    from lemonade_inferos.engine.model_folder import load_model_folder
    from lemonade_inferos.host import models
    from lemonade_inferos.host.models import LoadedModel, RequestGate

    built = []
    real = models.OrtEngine

    def counting(*args, **kwargs):
        built.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "OrtEngine", counting)
    model = LoadedModel("m", {}, calibrated_model, 512, ["cpu"], None, RequestGate(4, 4),
                        spec=load_model_folder(calibrated_model))
    engines = at_once([lambda: model.engine("inferos")] * 4)
    assert len(built) == 1 and all(e is engines[0] for e in engines)
    assert engines[0].turns is model.turns, "the engine's steps take the model's turns"
