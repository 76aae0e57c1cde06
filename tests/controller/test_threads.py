"""The thread policy measures what other processes take of the CPU, and spins only while they leave it alone."""

from __future__ import annotations

import time

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.controller import threads
from lemonade_inferos.controller.threads import ThreadPolicy


def _decide_after(policy: ThreadPolicy, seconds: float) -> bool:
    time.sleep(seconds)
    return policy.allow_spinning()


def test_spinning_stops_while_another_process_keeps_a_core_busy_and_comes_back_after():
    policy = ThreadPolicy()
    policy.allow_spinning()  # the first call starts the measurement
    assert _decide_after(policy, threads.MIN_WINDOW_S + 0.2)
    with busy_core():
        policy.allow_spinning()  # the window so far was quiet; measure the busy one
        assert not _decide_after(policy, threads.MIN_WINDOW_S + 0.5)
        assert policy.others_cores > threads.BUSY_ABOVE
    policy.allow_spinning()
    assert _decide_after(policy, threads.MIN_WINDOW_S + 0.5)
    assert policy.status()["allow_spinning"] is True


def test_a_short_window_keeps_the_last_decision():
    policy = ThreadPolicy(busy=True)
    policy.allow_spinning()
    assert policy.allow_spinning() is False  # no time has passed: nothing to judge yet
