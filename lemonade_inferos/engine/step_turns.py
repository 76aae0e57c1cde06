"""Turns at ONNX Runtime for one model's running sequences: iteration-level scheduling.

Every running sequence (a request being served) drives its own steps from its own worker thread; a step is one
session run: a prompt chunk, one decode token, or a draft's verification. One step of a model runs at a time (two at
once on a 2-core CPU only slow each other down), and when it ends the sequence that has waited longest goes next.
So the sequences' steps interleave round robin: a new request's prompt chunks run between the tokens of the replies
already streaming instead of after their ends, and while other sequences run, a prompt is cut into chunks of at
most ``prefill_budget`` tokens, so it holds their next tokens up for one such chunk at most.

Decode steps batch (``decode_batch.py``): the first decode step to get a turn leads, waits a moment
(``gather_s``, a fraction of a step) for the other decoding sequences' next tokens, and runs every decode step of
its graph waiting then in one session run, which costs little more than one step. Its companions skip their place
in the queue; a step that is not a decode (a prompt chunk, a draft's verification) waits for one batch at most.

A sequence alone takes its turns without waiting (one uncontended lock per step) and never waits to gather.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from lemonade_inferos.engine.decode_batch import DecodeStep

log = logging.getLogger(__name__)

DEFAULT_PREFILL_BUDGET = 128
# how long a batch's leader waits for the decoding sequences not yet at the turns: they come back from sampling
# and streaming their last token (well under a millisecond each), and waiting costs less than a step of its own
GATHER_S = 0.003


class StepTurns:
    """First come, first served, one step at a time."""

    def __init__(self, prefill_budget: int = DEFAULT_PREFILL_BUDGET, batch_decode: bool = True,
                 gather_s: float = GATHER_S) -> None:
        self.prefill_budget = prefill_budget
        self.batch_decode = batch_decode
        self.gather_s = gather_s
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()     # the steps waiting for a turn, in arrival order
        self._pending: list[DecodeStep] = []       # the decode steps among them (a leader may take them)
        self._decoders: set[object] = set()        # sequences whose last step was a decode step
        self._batches: set[Any] = set()            # the decode batches that ran (freed when one sequence is left)
        self._stepping = False
        self.sequences = 0         # sequences running now
        self.steps = 0             # sequences' steps since the model was loaded
        self.runs = 0              # session runs they took (fewer where decode steps batched)
        self.contended_steps = 0   # steps that waited for another sequence's
        self.waited_s = 0.0        # their waiting, summed
        self.batched_runs = 0      # session runs that decoded several sequences
        self.batched_rows = 0      # the decode steps they ran
        self.failed_batches = 0    # batched runs that failed (their steps then ran alone)

    def chunk_tokens(self, chunk: int) -> int:
        """How many prompt tokens a step may run: ``chunk`` alone, at most the budget beside other sequences."""
        return min(chunk, self.prefill_budget) if self.sequences > 1 else chunk

    @contextmanager
    def sequence(self) -> Iterator[object]:
        """A sequence's life (its generation), for :meth:`chunk_tokens`, batching and the report; yields the
        sequence's handle its steps name."""
        handle = object()
        with self._changed:
            self.sequences += 1
        try:
            yield handle
        finally:
            with self._changed:
                self.sequences -= 1
                self._decoders.discard(handle)
                if self.sequences <= 1:  # no batch can be running: its sequences would all still be here
                    for batch in self._batches:
                        batch.release()
                    self._batches.clear()
                self._changed.notify_all()   # a leader waiting for this sequence's step stops waiting

    @contextmanager
    def turn(self, sequence: object = None) -> Iterator[None]:
        """Wait for this sequence's turn, run its step, hand the turn to the longest-waiting sequence."""
        with self._changed:
            self._decoders.discard(sequence)
            entry = object()
            self._wait_for_turn(entry, lambda: False)
            self._stepping = True
            self.steps += 1
            self.runs += 1
        try:
            yield
        finally:
            self._end_turn([])

    def decode_turn(self, step: DecodeStep) -> None:
        """Run ``step`` (one sequence's next token): alone, in a batch this step leads, or in another's batch."""
        with self._changed:
            self._decoders.add(step.sequence)
            self._pending.append(step)
            self._wait_for_turn(step, lambda: step.taken)
            if step.taken:
                while not step.finished:
                    self._changed.wait()
            else:
                self._pending.remove(step)
                self._stepping = True
                mates = self._gather(step) if self.batch_decode else []
                self.steps += 1 + len(mates)
                self.runs += 1
        if step.taken:
            if step.failed:   # the batch failed: this step runs on its own, so only its own fault fails it
                with self.turn(step.sequence):
                    step.run_alone()
            return
        try:
            if mates:
                self._run_batch([step, *mates])
            else:
                step.run_alone()
        finally:
            self._end_turn(mates)

    def _wait_for_turn(self, entry: object, taken) -> None:
        """With the lock held: queue ``entry`` unless the turn is free, and wait until it is first (or taken)."""
        if not (self._stepping or self._waiting):
            return
        started = time.perf_counter()
        self._waiting.append(entry)
        self._changed.notify_all()   # a gathering leader sees the arrival
        while not taken() and (self._stepping or self._waiting[0] is not entry):
            self._changed.wait()
        if not taken():
            self._waiting.popleft()
        self.contended_steps += 1
        self.waited_s += time.perf_counter() - started

    def _gather(self, leader: DecodeStep) -> list[DecodeStep]:
        """With the lock held and the turn taken: the decode steps of ``leader``'s graph waiting now, after
        waiting up to ``gather_s`` for the sequences that decoded last time and have not come back yet."""
        deadline = time.perf_counter() + self.gather_s
        while True:
            mates = [step for step in self._pending if step.batch is leader.batch]
            if len(mates) + 1 >= len(self._decoders) or (remaining := deadline - time.perf_counter()) <= 0:
                break
            self._changed.wait(remaining)
        for step in mates:
            step.taken = True
            self._pending.remove(step)
            self._waiting.remove(step)
        if mates:
            self._batches.add(leader.batch)   # its rows are freed with the others' when one sequence is left
        return mates

    def _run_batch(self, steps: list[DecodeStep]) -> None:
        leader = steps[0]
        try:
            leader.batch.run(steps)
            failed = False
        except Exception:   # each step runs on its own instead (the leader here, in the turn it holds)
            log.exception("a batched decode step failed; its %d sequences step alone", len(steps))
            failed = True
        with self._changed:
            self.failed_batches += failed
            self.batched_runs += not failed
            self.batched_rows += 0 if failed else len(steps)
            for step in steps[1:]:
                step.failed = failed
        if failed:
            leader.run_alone()

    def _end_turn(self, mates: list[DecodeStep]) -> None:
        with self._changed:
            for step in mates:
                step.finished = True
            self._stepping = False
            self._changed.notify_all()

    def report(self) -> dict[str, Any]:
        with self._changed:
            rows_bytes = sum(batch.nbytes for batch in self._batches)
        return {"running_sequences": self.sequences, "prefill_chunk_budget": self.prefill_budget,
                "batch_decode": self.batch_decode, "steps": self.steps, "session_runs": self.runs,
                "contended_steps": self.contended_steps,
                "step_wait_s": round(self.waited_s, 3), "batched_runs": self.batched_runs,
                "batched_rows": self.batched_rows, "failed_batches": self.failed_batches,
                "batch_rows_bytes": rows_bytes}
