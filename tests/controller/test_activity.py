"""Background work (shadow passes) waits for the server to be idle."""

from __future__ import annotations

import threading
import time

from lemonade_inferos.controller.activity import RequestActivity


def _waiter(activity: RequestActivity) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(activity.wait_idle(timeout=10)), daemon=True)
    thread.start()
    return thread, result


def test_wait_idle_blocks_while_a_request_is_in_flight_and_returns_when_it_ends():
    activity = RequestActivity(quiet_s=0)
    activity.begin("a")
    thread, result = _waiter(activity)
    time.sleep(0.2)
    assert thread.is_alive() and activity.in_flight == 1
    activity.end("a")
    thread.join(2)
    assert result == [True] and activity.in_flight == 0


def test_ending_twice_or_an_unknown_request_is_harmless():
    activity = RequestActivity(quiet_s=0)
    activity.begin("a")
    activity.end("a")
    activity.end("a")
    activity.end("never-began")
    assert activity.wait_idle(timeout=0) is True


def test_a_request_that_never_ends_stops_counting_when_stale():
    activity = RequestActivity(quiet_s=0, stale_after_s=0.3)
    activity.begin("lost")
    started = time.monotonic()
    assert activity.wait_idle(timeout=5) is True
    assert 0.25 < time.monotonic() - started < 3


def test_wait_idle_times_out_and_close_releases_waiters():
    activity = RequestActivity()
    activity.begin("a")
    assert activity.wait_idle(timeout=0.1) is False
    thread, result = _waiter(activity)
    activity.close()
    thread.join(2)
    assert result == [False]


def test_wait_idle_waits_for_the_quiet_period_after_the_last_request():
    activity = RequestActivity(quiet_s=0.4)
    assert activity.wait_idle(timeout=0) is True  # nothing has run yet
    activity.begin("a")
    activity.end("a")
    assert activity.wait_idle(timeout=0.1) is False  # a client's next turn would come now
    started = time.monotonic()
    assert activity.wait_idle(timeout=5) is True
    assert time.monotonic() - started > 0.2
