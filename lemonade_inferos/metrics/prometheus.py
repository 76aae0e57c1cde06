"""Prometheus exposition of the controller's measurements (families built on each scrape)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily, Metric

PREFIX = "inferos"


QUANTILES = (("0.5", "median_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))


class ControllerCollector:
    """Reads the ``/v1/metrics`` document and exposes it with units in the names and quantiles as labels.

    ``totals=False`` leaves out the request and token counters: registered into the host's registry, the host's
    own counters already count them (the control API's exposition, which has no host beside it, keeps them).
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]], totals: bool = True) -> None:
        self._snapshot = snapshot
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        doc = self._snapshot()

        def gauge(name: str, doc_text: str, value: float | None, labels: dict[str, str] | None = None):
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc_text, labels=list(labels or {}))
            if value is not None:
                family.add_metric(list((labels or {}).values()), float(value))
            return family

        yield gauge("tokens_per_second", "Generated tokens per second over the window.",
                    doc["throughput"]["tokens_per_second"])
        yield gauge("requests_per_second", "Requests per second over the window.",
                    doc["throughput"]["requests_per_second"])
        yield from _quantile_families("request_latency", "Request latency over the window, queue wait included.",
                                      doc["latency"])
        yield from _quantile_families("time_to_first_token", "Measured TTFT over the window.",
                                      doc["first_token_latency"])
        yield gauge("process_resident_memory_bytes", "RSS of the server process.", doc["memory"]["rss_mb"] * 2**20)
        yield gauge("process_peak_resident_memory_bytes", "Peak RSS.", doc["memory"]["peak_usage_mb"] * 2**20)
        kv_bytes = GaugeMetricFamily(f"{PREFIX}_kv_cache_bytes", "KV bytes of the last request by tier (at rest).",
                                     labels=["tier"])
        for tier, value in (doc.get("kv_stats", {}).get("bytes_by_tier") or {}).items():
            kv_bytes.add_metric([tier], value)
        yield kv_bytes
        kv_tokens = GaugeMetricFamily(f"{PREFIX}_kv_cache_tokens", "KV tokens of the last request by tier.",
                                      labels=["tier"])
        for tier, value in (doc.get("kv_stats", {}).get("tokens_by_tier") or {}).items():
            kv_tokens.add_metric([tier], value)
        yield kv_tokens
        memory = doc["memory"]
        for name, key, text in (("kv_live_bytes", "kv_live_mb", "KV bytes of running requests (working buffers)."),
                                ("kv_at_rest_bytes", "kv_at_rest_mb", "KV bytes kept between requests (prefix "
                                 "store in memory, warm caches).")):
            yield gauge(name, text, memory[key] * 2**20 if memory.get(key) is not None else None)
        yield gauge("prefix_cache_bytes", "Bytes held by the prefix store.", doc["memory"].get("prefix_cache_bytes"))
        yield gauge("warm_cache_bytes", "Bytes of the live caches kept for their sequences' next turn.",
                    doc["memory"].get("warm_cache_bytes"))
        yield gauge("prefix_cache_hit_ratio", "Prompt tokens served from cache (warm or prefix store) / prompt tokens.",
                    doc["memory"].get("kv_cache_hit_rate"))
        yield from _prefix_tier_families(doc.get("prefix_cache") or {})
        yield gauge("cpu_utilization_ratio", "Process CPU utilisation (share of all cores).",
                    doc["device_utilization"]["cpu_utilization"])
        quality = doc.get("quality", {}).get("delta_ppl_est", {})
        yield gauge("quality_delta_ppl", "Online ΔPPL estimate of the active KV plan.", quality.get("current"))
        yield gauge("speculative_accept_ratio", "Accepted / drafted tokens over the last requests that drafted.",
                    doc.get("quality", {}).get("accept_rate", {}).get("current"))
        yield gauge("guard_level", "Quality guard step-back level (0 none, 1 no INT4, 2 no quantization).",
                    doc.get("quality", {}).get("guard", {}).get("level"))
        yield gauge("baseline_mode", "1 when baseline mode (every optimisation off) is on.",
                    1.0 if doc.get("optimization_status", {}).get("baseline_mode") else 0.0)
        if not self._totals:
            return
        totals = doc.get("totals", {})
        for name, key in (("requests_total", "requests"), ("prompt_tokens_total", "prompt_tokens"),
                          ("cache_tokens_total", "cache_tokens"), ("completion_tokens_total", "completion_tokens"),
                          ("request_errors_total", "errors"), ("requests_cancelled_total", "cancelled")):
            counter = CounterMetricFamily(f"{PREFIX}_controller_{name[:-6]}", f"{key} since start.")
            counter.add_metric([], totals.get(key, 0))
            yield counter


def _prefix_tier_families(prefix: dict[str, Any]) -> Iterator[Metric]:
    """Prefix hits by the tier that served them, and the shared (Valkey/Redis) tier's own numbers."""
    hits = CounterMetricFamily(f"{PREFIX}_prefix_hit_blocks", "Prefix-store blocks restored, by the tier that held "
                               "them (memory, disk, shared).", labels=["tier"])
    for tier, value in (prefix.get("hit_blocks_by_tier") or {}).items():
        hits.add_metric([tier], value)
    warm = (prefix.get("warm") or {}).get("hit_tokens")
    yield hits
    if warm is not None:
        counter = CounterMetricFamily(f"{PREFIX}_warm_hit_tokens", "Prompt tokens served from a warm live cache.")
        counter.add_metric([], warm)
        yield counter
    if prefix.get("segment_tokens") is not None:
        counter = CounterMetricFamily(f"{PREFIX}_segment_hit_tokens", "Prompt tokens served from shifted segments "
                                      "(segment reuse: the warm cache or the store's segment index).")
        counter.add_metric([], prefix["segment_tokens"])
        yield counter
    shared = prefix.get("shared")
    if not shared:
        return
    up = GaugeMetricFamily(f"{PREFIX}_shared_store_up", "1 while the shared prefix store answers.", labels=["url"])
    up.add_metric([shared["url"]], 1.0 if shared["up"] else 0.0)
    yield up
    for key, text in (("hits", "Blocks read from the shared store."), ("misses", "Blocks it did not hold."),
                      ("writes", "Blocks written to it."), ("errors", "Operations that failed (down, slow, full)."),
                      ("corrupt", "Values ignored: not the block their key names."),
                      ("dropped_writes", "Writes not sent (queue full, store down)."),
                      ("bytes_read", "Bytes read."), ("bytes_written", "Bytes written.")):
        counter = CounterMetricFamily(f"{PREFIX}_shared_store_{key}", text)
        counter.add_metric([], shared[key])
        yield counter
    latency = SummaryMetricFamily(f"{PREFIX}_shared_store_latency_seconds", "Round trips to the shared store.")
    latency.add_metric([], count_value=shared["latency_count"], sum_value=shared["latency_s_sum"])
    yield latency


def _quantile_families(name: str, doc_text: str, section: dict[str, Any]) -> Iterator[Metric]:
    """``{name}_seconds{quantile=...}`` and ``{name}_mean_seconds``, from a section of ``*_ms`` values."""
    quantiles = GaugeMetricFamily(f"{PREFIX}_{name}_seconds", doc_text, labels=["quantile"])
    for quantile, key in QUANTILES:
        if section.get(key) is not None:
            quantiles.add_metric([quantile], section[key] / 1000.0)
    yield quantiles
    mean = GaugeMetricFamily(f"{PREFIX}_{name}_mean_seconds", f"{doc_text} Mean.")
    if section.get("mean_ms") is not None:
        mean.add_metric([], section["mean_ms"] / 1000.0)
    yield mean
