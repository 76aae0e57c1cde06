"""A model's sequences take their steps in turn: one step at a time, the longest-waiting sequence next, a prompt
cut to the budget only while other sequences run, and decode steps waiting together run as one batch (a failed
batch's steps each run alone; a leader waits for the sequences that decode with it, never for one alone)."""

from __future__ import annotations

import threading
import time

from lemonade_inferos.engine.decode_batch import DecodeStep
from lemonade_inferos.engine.step_turns import StepTurns


def _wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline
        time.sleep(0.001)


def _held_turn(turns):
    """A thread holding the turn until the returned event is set."""
    holding, release = threading.Event(), threading.Event()

    def holder():
        with turns.turn():
            holding.set()
            release.wait(10)

    threading.Thread(target=holder).start()
    holding.wait(10)
    return release


def test_the_longest_waiting_sequence_steps_next():
    turns, order = StepTurns(), []
    release = _held_turn(turns)

    def step(name):
        with turns.turn():
            order.append(name)

    waiters = []
    for count, name in enumerate("bcd", start=1):   # queued one after another, in this order
        waiters.append(threading.Thread(target=step, args=(name,)))
        waiters[-1].start()
        _wait_for(lambda: len(turns._waiting) == count)
    release.set()
    for thread in waiters:
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


class _Batch:
    """Records the batches it runs (a stand-in for decode_batch.DecodeBatch: no model needed here)."""

    nbytes = 0

    def __init__(self, fail: bool = False) -> None:
        self.runs, self.fail, self.released = [], fail, False

    def run(self, steps):
        if self.fail:
            raise RuntimeError("batch fault")
        self.runs.append([step.token for step in steps])

    def release(self):
        self.released = True


def _step(batch, sequence, token, ran_alone):
    return DecodeStep(batch, sequence, None, token, None, None, None, lambda: ran_alone.append(token))


def _queue_decode_steps(turns, steps):
    """Each step's sequence decodes it from a thread of its own, queued in order behind a held turn, then
    released; returns when all have run."""
    release = _held_turn(turns)
    threads = [threading.Thread(target=turns.decode_turn, args=(step,)) for step in steps]
    for count, thread in enumerate(threads, start=1):
        thread.start()
        _wait_for(lambda: len(turns._waiting) == count)
    release.set()
    for thread in threads:
        thread.join(10)


def test_decode_steps_waiting_together_run_in_one_batch():
    turns, batch, alone = StepTurns(), _Batch(), []
    with turns.sequence() as first, turns.sequence() as second, turns.sequence() as third:
        _queue_decode_steps(turns, [_step(batch, first, 1, alone), _step(batch, second, 2, alone),
                                    _step(batch, third, 3, alone)])
    assert [sorted(tokens) for tokens in batch.runs] == [[1, 2, 3]] and not alone
    assert turns.batched_runs == 1 and turns.batched_rows == 3 and turns.steps == 4 and turns.runs == 2
    assert batch.released, "the rows are freed once one sequence is left"


def test_a_failed_batch_runs_each_of_its_steps_alone():
    turns, batch, alone = StepTurns(), _Batch(fail=True), []
    _queue_decode_steps(turns, [_step(batch, object(), 1, alone), _step(batch, object(), 2, alone)])
    assert sorted(alone) == [1, 2] and turns.failed_batches == 1 and turns.batched_runs == 0


def test_a_leader_waits_for_the_sequence_that_decoded_with_it_but_not_for_one_that_ended():
    turns, batch, alone = StepTurns(gather_s=60), _Batch(), []
    with turns.sequence() as first, turns.sequence() as second:
        _queue_decode_steps(turns, [_step(batch, first, 1, alone), _step(batch, second, 2, alone)])
        # both decoded last time: the first back at the turns waits for the other
        leader = threading.Thread(target=lambda: turns.decode_turn(_step(batch, first, 3, alone)))
        leader.start()
        _wait_for(lambda: turns._stepping)
        turns.decode_turn(_step(batch, second, 4, alone))
        leader.join(10)
        assert [sorted(tokens) for tokens in batch.runs] == [[1, 2], [3, 4]] and not alone
    with turns.sequence() as first:
        lonely = threading.Thread(target=lambda: turns.decode_turn(_step(batch, first, 5, alone)))
        lonely.start()
        lonely.join(10)
        assert not lonely.is_alive() and alone == [5], "a sequence alone never waits to gather"
