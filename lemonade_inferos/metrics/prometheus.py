"""Prometheus exposition of the controller's measurements (families built on each scrape from a typed snapshot)."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily, Metric

from lemonade_inferos.kvcache.reuse_stats import ReuseStats
from lemonade_inferos.metrics.snapshot import ControllerSnapshot, LatencySummary

PREFIX = "inferos"


QUANTILES = (("0.5", "median_s"), ("0.95", "p95_s"), ("0.99", "p99_s"))


def gauge(name: str, doc_text: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc_text)
    if value is not None:
        family.add_metric([], float(value))
    return family


def by_label(name: str, doc_text: str, label: str, values: dict[str, float] | None,
             family: type = GaugeMetricFamily) -> Metric:
    metric = family(f"{PREFIX}_{name}", doc_text, labels=[label])
    for key, value in (values or {}).items():
        metric.add_metric([key], value)
    return metric


class ControllerCollector:
    """Exposes a :class:`ControllerSnapshot` with units in the names and quantiles as labels.

    ``totals=False`` leaves out the request and token counters: registered into the host's registry, the host's
    own counters already count them (the control API's exposition, which has no host beside it, keeps them).
    """

    def __init__(self, snapshot: Callable[[], ControllerSnapshot], totals: bool = True) -> None:
        self._snapshot = snapshot
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        window = snap.window
        yield gauge("tokens_per_second", "Generated tokens per second over the window.", window.tokens_per_second)
        yield gauge("requests_per_second", "Requests per second over the window.", window.requests_per_second)
        yield from _quantile_families("request_latency", "Request latency over the window, queue wait included.",
                                      window.latency)
        yield from _quantile_families("time_to_first_token", "Measured TTFT over the window.", window.ttft)
        yield gauge("process_resident_memory_bytes", "RSS of the server process.", window.rss_bytes)
        yield gauge("process_peak_resident_memory_bytes", "Peak RSS.", window.peak_rss_bytes)
        kv = snap.last_kv
        yield by_label("kv_cache_bytes", "KV bytes of the last request by tier (at rest).", "tier",
                       kv.bytes_by_tier if kv else None)
        yield by_label("kv_cache_tokens", "KV tokens of the last request by tier.", "tier",
                       kv.tokens_by_tier if kv else None)
        memory, reuse = snap.kv_memory, snap.reuse
        yield gauge("kv_live_bytes", "KV bytes of running requests (working buffers).",
                    memory.live_bytes if memory else None)
        yield gauge("kv_at_rest_bytes", "KV bytes kept between requests (prefix store in memory, warm caches).",
                    memory.at_rest_bytes if memory else None)
        yield gauge("prefix_cache_bytes", "Bytes held by the prefix store.", reuse.store.bytes if reuse else None)
        yield gauge("warm_cache_bytes", "Bytes of the live caches kept for their sequences' next turn.",
                    reuse.warm.bytes if reuse else None)
        yield gauge("prefix_cache_hit_ratio", "Prompt tokens served from cache (warm or prefix store) / prompt tokens.",
                    reuse.store.hit_rate if reuse else None)
        if reuse is not None:
            yield from _reuse_families(reuse)
        yield gauge("cpu_utilization_ratio", "Process CPU utilisation (share of all cores).", window.cpu_utilization)
        yield gauge("quality_delta_ppl", "Online ΔPPL estimate of the active KV plan.", snap.quality.delta_ppl)
        yield gauge("speculative_accept_ratio", "Accepted / drafted tokens over the last requests that drafted.",
                    window.accept_rate.current)
        yield gauge("guard_level", "Quality guard step-back level (0 none, 1 no INT4, 2 no quantization).",
                    snap.quality.guard_level)
        yield gauge("baseline_mode", "1 when baseline mode (every optimisation off) is on.",
                    1.0 if snap.baseline_mode else 0.0)
        if self._totals:
            yield from _total_families(snap)


def _total_families(snap: ControllerSnapshot) -> Iterator[Metric]:
    totals = snap.window.totals
    for name, key, value in (("requests", "requests", totals.requests),
                             ("prompt_tokens", "prompt_tokens", totals.prompt_tokens),
                             ("cache_tokens", "cache_tokens", totals.cache_tokens),
                             ("completion_tokens", "completion_tokens", totals.completion_tokens),
                             ("request_errors", "errors", totals.errors),
                             ("requests_cancelled", "cancelled", totals.cancelled)):
        counter = CounterMetricFamily(f"{PREFIX}_controller_{name}", f"{key} since start.")
        counter.add_metric([], value)
        yield counter


def _reuse_families(reuse: ReuseStats) -> Iterator[Metric]:
    """Prefix hits by the tier that served them, and the shared (Valkey/Redis) tier's own numbers."""
    yield by_label("prefix_hit_blocks", "Prefix-store blocks restored, by the tier that held them (memory, disk, "
                   "shared).", "tier", reuse.store.hit_blocks_by_tier, CounterMetricFamily)
    counter = CounterMetricFamily(f"{PREFIX}_warm_hit_tokens", "Prompt tokens served from a warm live cache.")
    counter.add_metric([], reuse.warm.hit_tokens)
    yield counter
    counter = CounterMetricFamily(f"{PREFIX}_segment_hit_tokens", "Prompt tokens served from shifted segments "
                                  "(segment reuse: the warm cache or the store's segment index).")
    counter.add_metric([], reuse.segment_tokens)
    yield counter
    shared = reuse.store.shared
    if shared is None:
        return
    up = GaugeMetricFamily(f"{PREFIX}_shared_store_up", "1 while the shared prefix store answers.", labels=["url"])
    up.add_metric([shared.url], 1.0 if shared.up else 0.0)
    yield up
    for key, text in (("hits", "Blocks read from the shared store."), ("misses", "Blocks it did not hold."),
                      ("writes", "Blocks written to it."), ("errors", "Operations that failed (down, slow, full)."),
                      ("corrupt", "Values ignored: not the block their key names."),
                      ("dropped_writes", "Writes not sent (queue full, store down)."),
                      ("bytes_read", "Bytes read."), ("bytes_written", "Bytes written.")):
        counter = CounterMetricFamily(f"{PREFIX}_shared_store_{key}", text)
        counter.add_metric([], shared.counts[key])
        yield counter
    latency = SummaryMetricFamily(f"{PREFIX}_shared_store_latency_seconds", "Round trips to the shared store.")
    latency.add_metric([], count_value=shared.latency_count, sum_value=shared.latency_s_sum)
    yield latency


def _quantile_families(name: str, doc_text: str, summary: LatencySummary) -> Iterator[Metric]:
    """``{name}_seconds{quantile=...}`` and ``{name}_mean_seconds``."""
    quantiles = GaugeMetricFamily(f"{PREFIX}_{name}_seconds", doc_text, labels=["quantile"])
    for quantile, attribute in QUANTILES:
        value = getattr(summary, attribute)
        if value is not None:
            quantiles.add_metric([quantile], value)
    yield quantiles
    yield gauge(f"{name}_mean_seconds", f"{doc_text} Mean.", summary.mean_s)
