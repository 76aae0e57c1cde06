"""The controller's measurements over time windows, and the history that survives a restart.

Everything here is computed from InferenceStats that PostRun delivered, from
psutil, or from the KV cache and prefix store. What cannot be measured on this
machine (NPU and DirectML utilisation without their drivers) is ``None`` with
a ``reason``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.hooktypes import InferenceStats

log = logging.getLogger(__name__)
ACCEPT_RATE_WINDOW = 50  # requests that drafted (the design document's quality.accept_rate window)


def latency_summary_ms(values: list[float]) -> dict[str, float | None]:
    """Mean, median, p95, p99 and std in ms of durations in seconds (all None when there are none)."""
    if not values:
        return {"mean_ms": None, "median_ms": None, "p95_ms": None, "p99_ms": None, "std_ms": None}
    ms = np.asarray(values) * 1000.0
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "std_ms": float(ms.std())}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MetricsRecorder:
    """Keeps recent InferenceStats and builds the design document's ``/v1/metrics`` document from them."""

    def __init__(self, window_s: float = 60.0, max_requests: int = 10_000) -> None:
        self.window_s = window_s
        self._requests: deque[InferenceStats] = deque(maxlen=max_requests)
        self._lock = threading.Lock()
        self.totals = {"requests": 0, "prompt_tokens": 0, "cache_tokens": 0, "completion_tokens": 0, "errors": 0,
                       "cancelled": 0, "drafted_tokens": 0, "accepted_tokens": 0}
        self._drafting: deque[tuple[int, int]] = deque(maxlen=ACCEPT_RATE_WINDOW)  # (drafted, accepted)
        self.peak_rss_bytes = 0
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the first call always returns 0.0

    def record(self, stats: InferenceStats) -> None:
        with self._lock:
            self._requests.append(stats)
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += stats.prompt_n
            self.totals["cache_tokens"] += stats.cache_n
            self.totals["completion_tokens"] += stats.predicted_n
            self.totals["errors"] += stats.error_kind in ("request", "timeout", "stalled", "fault")
            self.totals["cancelled"] += stats.error_kind in ("cancelled", "shutdown")
            self.totals["drafted_tokens"] += stats.drafted_n
            self.totals["accepted_tokens"] += stats.accepted_n
            if stats.drafted_n:
                self._drafting.append((stats.drafted_n, stats.accepted_n))
            self.peak_rss_bytes = max(self.peak_rss_bytes, stats.peak_rss_bytes or 0, stats.rss_bytes)

    def accept_rate(self) -> dict[str, Any]:
        """Speculative decoding's acceptance over the last requests that drafted (the design document's window)."""
        with self._lock:
            window = list(self._drafting)
        drafted = sum(d for d, _ in window)
        return {"current": sum(a for _, a in window) / drafted if drafted else None,
                "method": "accepted / drafted tokens over the last requests that drafted",
                "window": ACCEPT_RATE_WINDOW, "sample_count": len(window),
                "drafted_tokens_total": self.totals["drafted_tokens"],
                "accepted_tokens_total": self.totals["accepted_tokens"]}

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

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``GET /v1/metrics`` document; ``extra`` carries the controller's sections (kv, quality, status)."""
        recent = self.recent()
        now = time.time()
        span = now - min(s.start_unix for s in recent) if recent else 0.0
        tokens = sum(s.predicted_n for s in recent)
        decoding = [s for s in recent if s.predicted_n and s.predicted_ms]
        decode_s = sum(s.predicted_ms for s in decoding) / 1000
        rss = self._process.memory_info().rss
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        document = {
            "timestamp": _now_iso(),
            "measurement_window": {"duration_seconds": self.window_s, "sample_count": len(recent),
                                   "description": f"requests that ended in the last {self.window_s:.0f} s"},
            "throughput": {"tokens_per_second": tokens / span if span > 0 else None,
                           "requests_per_second": len(recent) / span if span > 0 else None,
                           "decode_tokens_per_second": (sum(s.predicted_n for s in decoding) / decode_s
                                                        if decode_s > 0 else None),
                           "calculation": "total_tokens / total_time_seconds",
                           "note": "tokens_per_second and requests_per_second: generated tokens and requests over "
                                   "the time from the first request's start in the window to now (idle time "
                                   "included); decode_tokens_per_second: generated tokens over the time spent "
                                   "decoding them (what a client sees while its reply streams)"},
            "latency": {**latency_summary_ms([s.latency_s for s in recent]),
                        "queue_wait": latency_summary_ms([s.queue_wait_s for s in recent]),
                        "calculation": "end_time - arrival_time per request (queue wait included)"},
            "first_token_latency": {**{k: v for k, v in latency_summary_ms([s.ttft_s for s in recent if s.ttft_s is not None])
                                       .items() if k in ("mean_ms", "median_ms", "p95_ms")},
                                    "measurement_method": "measured: first token produced - request start",
                                    "note": "measured at the first emitted token, not estimated"},
            "memory": {"rss_mb": rss / 2**20, "peak_usage_mb": self.peak_rss_bytes / 2**20,
                       "total_allocated_mb": rss / 2**20},
            "device_utilization": self._device_utilization(),
            "totals": dict(self.totals),
        }
        if extra:
            for key, value in extra.items():
                if isinstance(value, dict) and isinstance(document.get(key), dict):
                    document[key].update(value)
                else:
                    document[key] = value
        return document

    def _device_utilization(self) -> dict[str, Any]:
        cpus = psutil.cpu_count() or 1
        return {"cpu_utilization": self._process.cpu_percent(None) / 100.0 / cpus,
                "system_cpu_utilization": psutil.cpu_percent(None) / 100.0,
                "npu_utilization": None, "dml_utilization": None,
                "reason": "NPU and DirectML utilisation need the Windows drivers' counters; not measurable here"}


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
