"""Memory as benchmarks measure it: the RSS of this process, sampled while a run is in progress."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRssSampler:
    """Samples a process's RSS (this one, or ``pid``: a server's) in a thread; ``peak_mb`` is the maximum seen
    while active."""

    def __init__(self, interval_s: float = 0.005, pid: int | None = None) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_bytes = 0

    def __enter__(self) -> "PeakRssSampler":
        self.peak_bytes = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self._interval_s)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20
