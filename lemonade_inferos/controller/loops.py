"""The controller's three loops (the design document's ``loops: {fast_ms, mid_ms, slow_ms}``).

    fast  memory pressure: RSS against --memory-limit (or system memory), so the prefix budget and the warm caches
          are given back between requests, not only at the next request
    mid   the thread policy's load measurement; lost devices tried again after their backoff; the sidecar agent's
          policy fetched (at most once a second)
    slow  config files checked for edits (hot reload); the quality scheduler's due evaluations; a metrics snapshot
          into the history every ``history_period_s``; stats queued for the sidecar agent sent

Each loop is a daemon thread that runs its tasks, then sleeps its period (read again every round: a reload that
changes ``loops`` takes effect at the next round). While no request runs, the fast and mid loops run at the slow
loop's period: an idle server wakes ten times a second, not 1,100 (measured: a 1 ms loop alone kept ~10% of a
core busy). While a request runs, a watching loop (fast, mid) whose tasks cost more CPU than its period allows waits longer:
it keeps at most ``MAX_DUTY`` of one core (measured: the 1 ms fast loop and 10 ms mid loop in Python, reading
``/proc`` through psutil, took 10-18% off a 2K-token prefill on 2 cores, whose ONNX Runtime threads wait for the
slowest of them at every parallel section). The slow loop is not capped: its tasks are scheduled work (a reload,
a due evaluation) that must run at its period however long they take. A task that raises is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

LOOPS = ("fast", "mid", "slow")
MAX_DUTY = 0.01    # the share of one core a watching loop's tasks may take: its wait stretches to cost / MAX_DUTY
DUTY_CAPPED = ("fast", "mid")


@dataclass
class Loop:
    name: str
    period_s: Callable[[], float]
    tasks: dict[str, Callable[[], None]] = field(default_factory=dict)
    rounds: int = 0
    last_round_s: float | None = None
    last_wait_s: float | None = None     # the configured period, or longer where the tasks' CPU time asked for it
    errors: int = 0


class ControllerLoops:
    def __init__(self, periods: Callable[[], dict[str, float]], busy: Callable[[], bool] = lambda: True) -> None:
        """``periods`` gives each loop's period in seconds (from the config's ``loops`` section); ``busy`` says
        whether a request is running (the fast and mid loops slow down to the slow period while it is not)."""
        self._periods = periods
        self._busy = busy
        self.loops = {name: Loop(name, lambda n=name: self._period(n)) for name in LOOPS}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _period(self, name: str) -> float:
        periods = self._periods()
        return periods[name] if name == "slow" or self._busy() else max(periods[name], periods["slow"])

    def add(self, loop: str, name: str, task: Callable[[], None]) -> None:
        self.loops[loop].tasks[name] = task

    def start(self) -> None:
        if self._threads:
            return
        for loop in self.loops.values():
            thread = threading.Thread(target=self._run, args=(loop,), name=f"inferos-loop-{loop.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def _run(self, loop: Loop) -> None:
        while not self._stop.is_set():
            started, cpu_started = time.perf_counter(), time.thread_time()
            for name, task in list(loop.tasks.items()):
                try:
                    task()
                except Exception:
                    loop.errors += 1
                    log.exception("controller %s loop: %s failed", loop.name, name)
            loop.rounds += 1
            loop.last_round_s = time.perf_counter() - started
            cost = time.thread_time() - cpu_started if loop.name in DUTY_CAPPED else 0.0
            loop.last_wait_s = max(0.0005, loop.period_s(), cost / MAX_DUTY)
            self._stop.wait(loop.last_wait_s)

    def status(self) -> dict[str, object]:
        periods = self._periods()
        return {name: {"period_ms": periods[name] * 1000, "now_ms": self._period(name) * 1000,
                       "tasks": list(loop.tasks), "rounds": loop.rounds,
                       "last_round_ms": None if loop.last_round_s is None else loop.last_round_s * 1000,
                       "last_wait_ms": None if loop.last_wait_s is None else loop.last_wait_s * 1000,
                       "max_duty": MAX_DUTY if name in DUTY_CAPPED else None,
                       "errors": loop.errors, "running": bool(self._threads) and not self._stop.is_set()}
                for name, loop in self.loops.items()}
