"""The thread policy measures what other processes take of the CPU, and spins only while they leave it alone."""

from __future__ import annotations

import time

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.controller import threads
from lemonade_inferos.controller.threads import ThreadPolicy


def _until(policy: ThreadPolicy, spinning: bool, timeout_s: float = 45.0) -> None:
    """Decide once per measurement window until the decision is ``spinning`` (other test servers may be busy
    for a moment, e.g. with a shadow pass, so a quiet machine is waited for, not assumed)."""
    deadline = time.monotonic() + timeout_s
    while policy.allow_spinning() != spinning:
        assert time.monotonic() < deadline, f"no {'quiet' if spinning else 'busy'} decision: {policy.status()}"
        time.sleep(threads.MIN_WINDOW_S + 0.1)


def test_spinning_stops_while_another_process_keeps_a_core_busy_and_comes_back_after():
    policy = ThreadPolicy()
    policy.allow_spinning()  # the first call starts the measurement
    _until(policy, spinning=True)
    with busy_core():
        _until(policy, spinning=False)
        assert policy.others_cores > threads.BUSY_ABOVE
    _until(policy, spinning=True)
    assert policy.status()["allow_spinning"] is True and policy.others_cores < threads.QUIET_BELOW


def test_a_short_window_keeps_the_last_decision():
    policy = ThreadPolicy(busy=True)
    policy.allow_spinning()
    assert policy.allow_spinning() is False  # no time has passed: nothing to judge yet
