"""Turns at ONNX Runtime for one model's running sequences: iteration-level scheduling.

Every running sequence (a request being served) drives its own steps from its own worker thread; a step is one
session run: a prompt chunk, one decode token, or a draft's verification. One step of a model runs at a time (two at
once on a 2-core CPU only slow each other down), and when it ends the sequence that has waited longest goes next.
So the sequences' steps interleave round robin: a new request's prompt chunks run between the tokens of the replies
already streaming instead of after their ends, and while other sequences run, a prompt is cut into chunks of at
most ``prefill_budget`` tokens, so it holds their next tokens up for one such chunk at most.

A sequence alone takes its turns without waiting (one uncontended lock per step).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

DEFAULT_PREFILL_BUDGET = 128


class StepTurns:
    """First come, first served, one step at a time."""

    def __init__(self, prefill_budget: int = DEFAULT_PREFILL_BUDGET) -> None:
        self.prefill_budget = prefill_budget
        self._changed = threading.Condition()
        self._waiting: deque[int] = deque()
        self._stepping = False
        self._tickets = 0
        self.sequences = 0         # sequences running now
        self.steps = 0             # steps run since the model was loaded
        self.contended_steps = 0   # steps that waited for another sequence's
        self.waited_s = 0.0        # their waiting, summed

    def chunk_tokens(self, chunk: int) -> int:
        """How many prompt tokens a step may run: ``chunk`` alone, at most the budget beside other sequences."""
        return min(chunk, self.prefill_budget) if self.sequences > 1 else chunk

    @contextmanager
    def sequence(self) -> Iterator[None]:
        """A sequence's life (its generation), for :meth:`chunk_tokens` and the report."""
        with self._changed:
            self.sequences += 1
        try:
            yield
        finally:
            with self._changed:
                self.sequences -= 1

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this sequence's turn, run its step, hand the turn to the longest-waiting sequence."""
        with self._changed:
            if self._stepping or self._waiting:
                started = time.perf_counter()
                ticket = self._tickets
                self._tickets += 1
                self._waiting.append(ticket)
                while self._stepping or self._waiting[0] != ticket:
                    self._changed.wait()
                self._waiting.popleft()
                self.contended_steps += 1
                self.waited_s += time.perf_counter() - started
            self._stepping = True
            self.steps += 1
        try:
            yield
        finally:
            with self._changed:
                self._stepping = False
                self._changed.notify_all()

    def report(self) -> dict[str, Any]:
        return {"running_sequences": self.sequences, "prefill_chunk_budget": self.prefill_budget,
                "steps": self.steps, "contended_steps": self.contended_steps,
                "step_wait_s": round(self.waited_s, 3)}
