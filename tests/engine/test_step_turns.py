"""A model's sequences take their steps in turn: one step at a time, the longest-waiting sequence next, and a prompt
cut to the budget only while other sequences run."""

from __future__ import annotations

import threading
import time

from lemonade_inferos.engine.step_turns import StepTurns


def _wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline
        time.sleep(0.001)


def test_the_longest_waiting_sequence_steps_next():
    turns, order = StepTurns(), []
    holding, release = threading.Event(), threading.Event()

    def holder():
        with turns.turn():
            holding.set()
            release.wait(10)

    def step(name):
        with turns.turn():
            order.append(name)

    first = threading.Thread(target=holder)
    first.start()
    holding.wait(10)
    waiters = []
    for count, name in enumerate("bcd", start=1):   # queued one after another, in this order
        waiters.append(threading.Thread(target=step, args=(name,)))
        waiters[-1].start()
        _wait_for(lambda: len(turns._waiting) == count)
    release.set()
    for thread in [first, *waiters]:
        thread.join(10)
    assert order == ["b", "c", "d"]
    assert turns.steps == 4 and turns.contended_steps == 3 and turns.waited_s > 0


def test_a_prompt_is_cut_to_the_budget_only_beside_other_sequences():
    turns = StepTurns(prefill_budget=64)
    with turns.sequence():
        assert turns.chunk_tokens(512) == 512, "alone: the engine's own chunk"
        with turns.sequence():
            assert turns.chunk_tokens(512) == 64 and turns.chunk_tokens(32) == 32
    assert turns.sequences == 0
