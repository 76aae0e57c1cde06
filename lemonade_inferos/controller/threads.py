"""The thread policy: spin-wait ONNX Runtime's threads only while no other process wants the cores.

Measured on this project's 2-core machines (SmolLM2-135M int4, 512-token prompt, greedy decode, tok/s; the
numbers are in docs/benchmarks.md, "Decode"): on a quiet machine two intra-op threads that spin between
parallel sections decode ~1.5x faster than og.Generator (which decodes on one core); with one other process
keeping a core busy, the spinning threads fight it for the core and decode at ~0.7x og.Generator, while the same
two threads without spinning (or one thread) decode at ~1.0x. So spinning is on while the other processes' CPU
use stays low and off while it is high, decided before each request from CPU time measured since the last
decision, with hysteresis so that a blip does not rebuild the session (a change of the session options means a
new ONNX Runtime session, ~0.3-1 s once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

BUSY_ABOVE = 0.6        # other processes' CPU, in cores, above which spinning goes off
QUIET_BELOW = 0.3       # ... and below which it comes back
MIN_WINDOW_S = 1.0      # shorter windows keep the last decision (too little CPU time to judge)


def others_cpu_seconds(process: psutil.Process | None = None) -> tuple[float, float]:
    """The load signal: (monotonic seconds, CPU seconds used by every process but this one since boot)."""
    system = psutil.cpu_times()
    busy_total = system.user + system.system + getattr(system, "nice", 0.0) + getattr(system, "irq", 0.0) \
        + getattr(system, "softirq", 0.0)
    ours = sum((process or psutil.Process()).cpu_times()[:4])  # user, system, children_user, children_system
    return time.monotonic(), busy_total - ours


@dataclass
class ThreadPolicy:
    """Decides ``allow_spinning`` from what other processes used of the CPU since the last decision.

    ``sample`` is the load signal (:func:`others_cpu_seconds`); a test drives the policy with one it controls.
    """

    busy: bool = False
    others_cores: float | None = None   # the last measurement, for the metrics document
    sample: Callable[[], tuple[float, float]] = field(default=others_cpu_seconds, repr=False)
    _last: tuple[float, float] | None = field(default=None, repr=False)

    def allow_spinning(self) -> bool:
        self.measure()
        return not self.busy

    def measure(self) -> None:
        """Update the decision from the CPU time used since the last measurement (at least a second ago)."""
        now, others = self.sample()
        if self._last is None:
            self._last = (now, others)
            return
        if now - self._last[0] < MIN_WINDOW_S:
            return  # too little CPU time to judge: the last decision stands
        then, others_then = self._last
        self._last = (now, others)
        self.others_cores = max(0.0, others - others_then) / (now - then)
        if self.busy and self.others_cores < QUIET_BELOW:
            self.busy = False
        elif not self.busy and self.others_cores > BUSY_ABOVE:
            self.busy = True

    def status(self) -> dict[str, object]:
        return {"allow_spinning": not self.busy, "other_processes_cpu_cores": self.others_cores,
                "busy_above_cores": BUSY_ABOVE, "quiet_below_cores": QUIET_BELOW}
