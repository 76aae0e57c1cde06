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
core busy). A task that raises is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

LOOPS = ("fast", "mid", "slow")


@dataclass
class Loop:
    name: str
    period_s: Callable[[], float]
    tasks: dict[str, Callable[[], None]] = field(default_factory=dict)
    rounds: int = 0
    last_round_s: float | None = None
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
            started = time.perf_counter()
            for name, task in list(loop.tasks.items()):
                try:
                    task()
                except Exception:
                    loop.errors += 1
                    log.exception("controller %s loop: %s failed", loop.name, name)
            loop.rounds += 1
            loop.last_round_s = time.perf_counter() - started
            self._stop.wait(max(0.0005, loop.period_s()))

    def status(self) -> dict[str, object]:
        periods = self._periods()
        return {name: {"period_ms": periods[name] * 1000, "now_ms": self._period(name) * 1000,
                       "tasks": list(loop.tasks), "rounds": loop.rounds,
                       "last_round_ms": None if loop.last_round_s is None else loop.last_round_s * 1000,
                       "errors": loop.errors, "running": bool(self._threads) and not self._stop.is_set()}
                for name, loop in self.loops.items()}
