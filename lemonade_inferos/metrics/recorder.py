"""The controller's measurements over time windows, and the history that survives a restart.

Everything here is computed from InferenceStats that PostRun delivered or from
psutil; ``snapshot()`` is typed (``snapshot.py``) and ``document.py`` renders it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.metrics.snapshot import AcceptRate, LatencySummary, RequestTotals, WindowSnapshot

log = logging.getLogger(__name__)
ACCEPT_RATE_WINDOW = 50  # requests that drafted (the design document's quality.accept_rate window)


class MetricsRecorder:
    """Keeps recent InferenceStats and builds the design document's ``/v1/metrics`` document from them."""

    def __init__(self, window_s: float = 60.0, max_requests: int = 10_000) -> None:
        self.window_s = window_s
        self._requests: deque[InferenceStats] = deque(maxlen=max_requests)
        self._lock = threading.Lock()
        self.totals = RequestTotals()
        self._drafting: deque[tuple[int, int]] = deque(maxlen=ACCEPT_RATE_WINDOW)  # (drafted, accepted)
        self.peak_rss_bytes = 0
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the first call always returns 0.0

    def record(self, stats: InferenceStats) -> None:
        with self._lock:
            self._requests.append(stats)
            totals = self.totals
            totals.requests += 1
            totals.prompt_tokens += stats.prompt_n
            totals.cache_tokens += stats.cache_n
            totals.completion_tokens += stats.predicted_n
            totals.errors += stats.error_kind in ("request", "timeout", "stalled", "fault")
            totals.cancelled += stats.error_kind in ("cancelled", "shutdown")
            totals.drafted_tokens += stats.drafted_n
            totals.accepted_tokens += stats.accepted_n
            if stats.drafted_n:
                self._drafting.append((stats.drafted_n, stats.accepted_n))
            self.peak_rss_bytes = max(self.peak_rss_bytes, stats.peak_rss_bytes or 0, stats.rss_bytes)

    def accept_rate(self) -> AcceptRate:
        """Speculative decoding's acceptance over the last requests that drafted (the design document's window)."""
        with self._lock:
            window = list(self._drafting)
            drafted_total, accepted_total = self.totals.drafted_tokens, self.totals.accepted_tokens
        drafted = sum(d for d, _ in window)
        return AcceptRate(current=sum(a for _, a in window) / drafted if drafted else None,
                          window=ACCEPT_RATE_WINDOW, sample_count=len(window),
                          drafted_tokens_total=drafted_total, accepted_tokens_total=accepted_total)

    def prefill_rate(self, live_form: str | None = None, min_tokens: int = 64) -> float | None:
        """Prompt tokens per second over the last requests that prefilled at least ``min_tokens`` (of one live KV
        form when given): what a request's target TTFT is judged by."""
        with self._lock:
            rows = [s for s in list(self._requests)[-50:] if s.prompt_per_second and s.error is None
                    and s.prompt_n - s.cache_n >= min_tokens
                    and (live_form is None or (s.kv is not None and s.kv.live_form == live_form))]
        if not rows:
            return None
        tokens = sum(s.prompt_n - s.cache_n for s in rows)
        return tokens / sum((s.prompt_n - s.cache_n) / s.prompt_per_second for s in rows)

    def recent(self) -> list[InferenceStats]:
        cutoff = time.time() - self.window_s
        with self._lock:
            return [s for s in self._requests if s.end_unix >= cutoff]

    @property
    def last(self) -> InferenceStats | None:
        with self._lock:
            return self._requests[-1] if self._requests else None

    def snapshot(self) -> WindowSnapshot:
        """The requests that ended in the window and the process now (``GET /v1/metrics``'s own sections)."""
        recent = self.recent()
        now = time.time()
        span = now - min(s.start_unix for s in recent) if recent else 0.0
        decoding = [s for s in recent if s.predicted_n and s.predicted_ms]
        decode_s = sum(s.predicted_ms for s in decoding) / 1000
        rss = self._process.memory_info().rss
        with self._lock:
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
            totals = replace(self.totals)
        return WindowSnapshot(
            at_unix=now, window_s=self.window_s, sample_count=len(recent),
            tokens_per_second=sum(s.predicted_n for s in recent) / span if span > 0 else None,
            requests_per_second=len(recent) / span if span > 0 else None,
            decode_tokens_per_second=sum(s.predicted_n for s in decoding) / decode_s if decode_s > 0 else None,
            latency=LatencySummary.of(s.latency_s for s in recent),
            queue_wait=LatencySummary.of(s.queue_wait_s for s in recent),
            ttft=LatencySummary.of(s.ttft_s for s in recent if s.ttft_s is not None),
            rss_bytes=rss, peak_rss_bytes=self.peak_rss_bytes,
            cpu_utilization=self._process.cpu_percent(None) / 100.0 / (psutil.cpu_count() or 1),
            system_cpu_utilization=psutil.cpu_percent(None) / 100.0,
            totals=totals, accept_rate=self.accept_rate())


class History:
    """A bounded time series of metric snapshots, appended to a JSON-lines file so it survives a restart."""

    def __init__(self, path: Path, max_entries: int = 1000) -> None:
        self.path = path
        self.max_entries = max_entries
        self._entries: deque[dict[str, Any]] = deque(maxlen=max_entries)
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        """Read the entries back; a damaged file (bad bytes, a line that is not a JSON object) is quarantined
        and rewritten with the entries that are intact, so one bad line never stops the server."""
        if not self.path.is_file():
            return
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            log.warning("cannot read %s (%s): starting a new history", self.path, exc)
            return
        bad = 0
        for line in raw.splitlines():
            try:
                entry = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                entry = None
            if isinstance(entry, dict):
                self._entries.append(entry)
            elif line.strip():
                bad += 1
        if bad:
            quarantine(self.path, f"{bad} line(s) that are not JSON objects")
            self._rewrite()

    def _rewrite(self) -> None:
        atomic_write(self.path, "".join(json.dumps(e, default=str) + "\n" for e in self._entries))

    def append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries.append(entry)
            try:
                if len(self._entries) == self.max_entries:  # rewrite to keep the file bounded too
                    self._rewrite()
                else:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(entry, default=str) + "\n")
            except OSError as exc:  # a full disk loses history lines, never a request
                log.warning("could not write %s: %s", self.path, exc)

    def entries(self, limit: int | None = None, kind: str | None = None,
                exclude_kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            items = [e for e in self._entries if (kind is None or e.get("kind") == kind)
                     and (exclude_kind is None or e.get("kind") != exclude_kind)]
        return items[-limit:] if limit else items
