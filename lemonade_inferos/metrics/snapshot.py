"""The controller's measurements as typed snapshots, in bytes and seconds.

One snapshot is taken per read (a scrape, a ``GET /v1/metrics``, a history entry) and rendered separately: to
the JSON documents (``document.py``, unchanged on the wire), to Prometheus families (``prometheus.py``) and so to
the dashboard, which reads the JSON. Nothing downstream reads a measurement back by string key or undoes a unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from lemonade_inferos.kvcache.reuse_stats import ReuseStats
from lemonade_inferos.kvcache.stats import KVStats


@dataclass(frozen=True)
class LatencySummary:
    """Mean, median, p95, p99 and standard deviation of durations, in seconds (all None when there are none)."""

    mean_s: float | None = None
    median_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    std_s: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencySummary:
        seconds = np.asarray(list(values), dtype=np.float64)
        if not seconds.size:
            return cls()
        return cls(mean_s=float(seconds.mean()), median_s=float(np.median(seconds)),
                   p95_s=float(np.percentile(seconds, 95)), p99_s=float(np.percentile(seconds, 99)),
                   std_s=float(seconds.std()))


@dataclass
class RequestTotals:
    """Counts since start (the recorder adds to them under its lock; a snapshot holds a copy)."""

    requests: int = 0
    prompt_tokens: int = 0
    cache_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    cancelled: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class AcceptRate:
    """Speculative decoding's acceptance over the last requests that drafted."""

    current: float | None
    window: int
    sample_count: int
    drafted_tokens_total: int
    accepted_tokens_total: int


@dataclass(frozen=True)
class WindowSnapshot:
    """The requests that ended in the recorder's window, and the process as it is now."""

    at_unix: float
    window_s: float
    sample_count: int
    tokens_per_second: float | None        # generated tokens over the window's wall time (idle included)
    requests_per_second: float | None
    decode_tokens_per_second: float | None  # generated tokens over the time spent decoding them
    latency: LatencySummary                # arrival to end, queue wait included
    queue_wait: LatencySummary
    ttft: LatencySummary
    rss_bytes: int
    peak_rss_bytes: int
    cpu_utilization: float                 # this process, share of all cores
    system_cpu_utilization: float
    totals: RequestTotals
    accept_rate: AcceptRate


@dataclass(frozen=True)
class KVMemory:
    """KV bytes now: the running requests' live caches, and what is kept at rest between requests."""

    live_bytes: int
    live_working_buffer_bytes: int
    running_requests: int
    at_rest_bytes: int
    prefix_store_bytes: int
    warm_cache_bytes: int
    live_form: dict[str, Any] | None = None   # the engine's live KV report (form, rate, reason)

    @property
    def usage_bytes(self) -> int:
        return self.live_bytes + self.at_rest_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kv_cache_usage_bytes": self.usage_bytes}


@dataclass(frozen=True)
class QualitySnapshot:
    """The online ΔPPL estimate, the guard, the scheduled evaluations and the targets they are judged by."""

    estimate: dict[str, Any]                # the guard's estimate document (``current``, ``baseline``, method)
    guard: dict[str, Any]                   # the guard's status (``level``, ``action``, trips)
    full_evaluation: dict[str, Any]
    light_evaluation: dict[str, Any]
    max_delta_ppl: float
    min_accept_rate: float
    speculative_mode: str

    @property
    def delta_ppl(self) -> float | None:
        return self.estimate.get("current")

    @property
    def guard_level(self) -> int:
        return int(self.guard.get("level") or 0)


@dataclass(frozen=True)
class ControllerSnapshot:
    """Everything ``GET /v1/metrics`` reports, measured at one moment."""

    window: WindowSnapshot
    quality: QualitySnapshot
    memory_pressure: float
    last_kv: KVStats | None = None          # what the last request's cache reported
    kv_memory: KVMemory | None = None       # None without the plugin (no caches to measure)
    reuse: ReuseStats | None = None
    optimization: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] | None = None
    servers: dict[str, float] = field(default_factory=dict)   # server id -> last report (unix)
    providers: frozenset[str] = frozenset()                   # execution providers this machine offers
    system_memory_used_bytes: int = 0

    @property
    def baseline_mode(self) -> bool:
        return bool(self.optimization.get("baseline_mode"))
