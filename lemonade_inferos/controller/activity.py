"""Requests in flight, so that background work runs only while the server is idle.

A shadow pass scores hundreds of tokens twice; on a 2-core AI PC that would take
the cores from the next user request and show up in its time to first token.
Background work therefore waits, before each chunk it runs, until no request
has been in flight for ``quiet_s`` (a chat client or an agent sends its next
turn milliseconds after the last one ends; a person takes seconds). PreRun begins a request and PostRun ends it (ending twice is
harmless); an entry that never ends, because the host failed between the two
hooks, stops counting after ``stale_after_s``. After ``close()`` (host shutdown)
waiting returns False at once, so background work gives up instead of holding
the process.
"""

from __future__ import annotations

import threading
import time


class RequestActivity:
    def __init__(self, quiet_s: float = 0.5, stale_after_s: float = 600.0) -> None:
        self.quiet_s = quiet_s
        self.stale_after_s = stale_after_s
        self._last_end = float("-inf")
        self._started: dict[str, float] = {}
        self._changed = threading.Condition()
        self._closed = False

    def begin(self, request_id: str) -> None:
        with self._changed:
            self._started[request_id] = time.monotonic()

    def end(self, request_id: str) -> None:
        with self._changed:
            if self._started.pop(request_id, None) is not None:
                self._last_end = time.monotonic()
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self._live()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request has been in flight for ``quiet_s``.

        False when ``timeout`` seconds passed first, or after ``close()``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                quiet_left = 1.0 if self._live() else self._last_end + self.quiet_s - now
                if quiet_left <= 0:
                    return True
                if deadline is not None and now >= deadline:
                    return False
                # wake up now and then: a stale entry stops counting without anyone calling end()
                self._changed.wait(min(quiet_left, 1.0, float("inf") if deadline is None else deadline - now))
            return False

    def _live(self) -> int:
        cutoff = time.monotonic() - self.stale_after_s
        for request_id in [r for r, started in self._started.items() if started < cutoff]:
            del self._started[request_id]
        return len(self._started)
