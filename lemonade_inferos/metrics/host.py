"""The host's own measurements: what ``/api/v1/stats`` reports and the host's Prometheus families.

One exposition (``/metrics``): the host registers :class:`HostCollector` into its registry, and a plugin adds
its own collector into the same registry at start-up (the inferos plugin adds the controller's, without the
totals the host already counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lemonade_inferos.hooktypes import InferenceStats


@dataclass
class HostStats:
    """The last request and totals since start."""

    last: InferenceStats | None = None
    request_count_total: int = 0
    input_tokens_total: int = 0
    output_tokens_total: int = 0
    prompt_tokens_total: int = 0
    cache_tokens_total: int = 0
    errors_total: int = 0        # requests that failed: the caller's mistakes, time limits and faults
    cancelled_total: int = 0     # clients that went away, and runs ended by a shutdown: not errors
    drafted_tokens_total: int = 0
    accepted_tokens_total: int = 0

    def record(self, stats: InferenceStats) -> None:
        self.last = stats
        self.request_count_total += 1
        self.prompt_tokens_total += stats.prompt_n
        self.cache_tokens_total += stats.cache_n
        self.input_tokens_total += stats.prompt_n - stats.cache_n
        self.output_tokens_total += stats.predicted_n
        self.errors_total += stats.error_kind in ("request", "timeout", "fault")
        self.cancelled_total += stats.error_kind in ("cancelled", "shutdown")
        self.drafted_tokens_total += stats.drafted_n
        self.accepted_tokens_total += stats.accepted_n


class HostCollector:
    """Host counters for Prometheus, built from :class:`HostStats` on each scrape."""

    def __init__(self, stats: HostStats, api_version: str, version: str) -> None:
        self.stats, self.api_version, self.version = stats, api_version, version

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        up = GaugeMetricFamily("lemonade_server_up", "Whether the Lemonade server is running.")
        up.add_metric([], 1)
        info = GaugeMetricFamily("lemonade_server_info", "Server build information.", labels=["version", "inferos"])
        info.add_metric([self.api_version, self.version], 1)
        yield up
        yield info
        for name, value, doc in (("requests", stats.request_count_total, "Generate calls served."),
                                 ("prompt_tokens", stats.prompt_tokens_total, "Prompt tokens, cached included."),
                                 ("cache_tokens", stats.cache_tokens_total, "Prompt tokens served from the KV cache."),
                                 ("completion_tokens", stats.output_tokens_total, "Tokens generated."),
                                 ("request_errors", stats.errors_total,
                                  "Generate calls that failed (bad input, time limit, engine fault)."),
                                 ("requests_cancelled", stats.cancelled_total,
                                  "Generate calls ended because the client went away or the server stopped."),
                                 ("speculative_drafted_tokens", stats.drafted_tokens_total,
                                  "Tokens proposed by speculative decoding's drafter."),
                                 ("speculative_accepted_tokens", stats.accepted_tokens_total,
                                  "Drafted tokens the model accepted.")):
            counter = CounterMetricFamily(f"inferos_{name}", doc)
            counter.add_metric([], value)
            yield counter
        if stats.last is not None:
            last = stats.last
            for name, value, doc in (("last_time_to_first_token_seconds", last.ttft_s, "TTFT of the last request."),
                                     ("last_decode_tokens_per_second", last.predicted_per_second,
                                      "Decode speed of the last request.")):
                if value is not None:
                    gauge = GaugeMetricFamily(f"inferos_{name}", doc)
                    gauge.add_metric([], value)
                    yield gauge
