"""The thread policy measures what other processes take of the CPU, and spins only while they leave it alone.

The decisions are driven by a load signal the test controls (another process's CPU seconds on a clock of the
test's own), so they hold on a machine that other work keeps busy; the real signal is checked where a busy
machine cannot change the answer: a process of ours keeping a core busy is seen.
"""

from __future__ import annotations

import time

import pytest

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.controller import threads
from lemonade_inferos.controller.threads import ThreadPolicy, others_cpu_seconds


class Load:
    """A load signal: ``run(seconds, cores)`` advances the clock with other processes using ``cores``."""

    def __init__(self) -> None:
        self.now, self.others = 0.0, 0.0

    def __call__(self) -> tuple[float, float]:
        return self.now, self.others

    def run(self, seconds: float, cores: float) -> None:
        self.now += seconds
        self.others += seconds * cores


def test_spinning_stops_while_other_processes_keep_a_core_busy_and_comes_back_after():
    load = Load()
    policy = ThreadPolicy(sample=load)
    assert policy.allow_spinning() is True  # the first call starts the measurement
    load.run(1.5, cores=0.1)
    assert policy.allow_spinning() is True and policy.others_cores == pytest.approx(0.1)
    load.run(1.5, cores=1.0)
    assert policy.allow_spinning() is False and policy.others_cores > threads.BUSY_ABOVE
    load.run(1.5, cores=0.45)   # between the thresholds: the hysteresis keeps the decision
    assert policy.allow_spinning() is False
    load.run(1.5, cores=0.1)
    assert policy.allow_spinning() is True
    assert policy.status()["allow_spinning"] is True and policy.others_cores < threads.QUIET_BELOW


def test_a_short_window_keeps_the_last_decision():
    load = Load()
    policy = ThreadPolicy(busy=True, sample=load)
    policy.allow_spinning()
    load.run(threads.MIN_WINDOW_S / 2, cores=0.0)
    assert policy.allow_spinning() is False  # too little time has passed: nothing to judge yet


def test_the_load_signal_sees_another_process_keeping_a_core_busy():
    """Other load on the machine can only add to what is measured, so this holds on a busy machine too."""
    with busy_core():
        then, others_then = others_cpu_seconds()
        time.sleep(1.5)
        now, others = others_cpu_seconds()
    assert (others - others_then) / (now - then) > threads.BUSY_ABOVE
