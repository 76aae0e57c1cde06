"""The host's own measurements: what ``/api/v1/stats`` reports and the host's Prometheus families.

One exposition (``/metrics``): the host registers :class:`HostCollector` into its registry, and a plugin adds
its own collector into the same registry at start-up (the inferos plugin adds the controller's, without the
totals the host already counts).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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
    last_cache_by_model: dict[str, int] = field(default_factory=dict)    # the last request's cached tokens
    cache_tokens_by_model: dict[str, int] = field(default_factory=dict)  # since start
    routing_decisions_total: int = 0
    routing_switches_total: int = 0
    # a conversation's last routed candidate, for the switch count (the most recent ROUTED_CONVERSATIONS only)
    last_route: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def record(self, stats: InferenceStats) -> None:
        self.last = stats
        self.last_cache_by_model[stats.model] = stats.cache_n
        self.cache_tokens_by_model[stats.model] = self.cache_tokens_by_model.get(stats.model, 0) + stats.cache_n
        self.request_count_total += 1
        self.prompt_tokens_total += stats.prompt_n
        self.cache_tokens_total += stats.cache_n
        self.input_tokens_total += stats.prompt_n - stats.cache_n
        self.output_tokens_total += stats.predicted_n
        self.errors_total += stats.error_kind in ("request", "timeout", "fault")
        self.cancelled_total += stats.error_kind in ("cancelled", "shutdown")
        self.drafted_tokens_total += stats.drafted_n
        self.accepted_tokens_total += stats.accepted_n


    def record_route(self, conversation: str, route_to: str) -> None:
        """A router collection's decision. A switch is a conversation's turn routed to another candidate than its
        turn before, Lemonade's route-stability count (a switch re-reads the whole history on a cold model)."""
        self.routing_decisions_total += 1
        before = self.last_route.pop(conversation, None)
        self.routing_switches_total += before is not None and before != route_to
        self.last_route[conversation] = route_to
        if len(self.last_route) > ROUTED_CONVERSATIONS:
            self.last_route.popitem(last=False)


ROUTED_CONVERSATIONS = 4096


class HostCollector:
    """Host counters for Prometheus, built from :class:`HostStats` on each scrape.

    ``loaded`` returns the loaded models (name, recipe, device, ctx_size) and the most that may be loaded;
    ``telemetry`` the span export counts. Lemonade's own family names come first (``lemonade_*``).
    """

    def __init__(self, stats: HostStats, api_version: str, version: str,
                 loaded: Callable[[], tuple[list[dict[str, Any]], int]] = lambda: ([], 0),
                 telemetry: Callable[[], dict[str, int]] = dict) -> None:
        self.stats, self.api_version, self.version = stats, api_version, version
        self.loaded, self.telemetry = loaded, telemetry

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        up = GaugeMetricFamily("lemonade_server_up", "Whether the Lemonade server is running.")
        up.add_metric([], 1)
        info = GaugeMetricFamily("lemonade_server_info", "Server build information.", labels=["version", "inferos"])
        info.add_metric([self.api_version, self.version], 1)
        yield up
        yield info
        yield from self._lemonade_families()
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

    def _lemonade_families(self) -> Iterator[Metric]:
        stats = self.stats
        models, most = self.loaded()
        count = GaugeMetricFamily("lemonade_loaded_models", "Models loaded now.", labels=["type"])
        count.add_metric(["llm"], len(models))
        yield count
        limit = GaugeMetricFamily("lemonade_max_loaded_models", "Most models loaded at once.", labels=["type"])
        limit.add_metric(["llm"], most)
        yield limit
        info = GaugeMetricFamily("lemonade_model_info", "A loaded model.",
                                 labels=["model_name", "recipe", "device", "type", "ctx_size"])
        for m in models:
            info.add_metric([m["name"], m["recipe"], m["device"], "llm", str(m["ctx_size"])], 1)
        yield info
        last = GaugeMetricFamily("lemonade_model_cache_tokens",
                                 "Prompt tokens of a model's last request served from the KV cache.",
                                 labels=["model_name"])
        total = CounterMetricFamily("lemonade_model_cache_tokens",
                                    "Prompt tokens served from a model's KV cache since start.", labels=["model_name"])
        for name, value in stats.last_cache_by_model.items():
            last.add_metric([name], value)
        for name, value in stats.cache_tokens_by_model.items():
            total.add_metric([name], value)
        yield last
        yield total
        for name, value, doc in (
                ("cache_tokens", stats.cache_tokens_total, "Prompt tokens served from the KV cache since start."),
                ("routing_decisions", stats.routing_decisions_total, "Requests a router collection dispatched."),
                ("routing_switches", stats.routing_switches_total,
                 "Routed turns of a conversation sent to another candidate than its turn before.")):
            counter = CounterMetricFamily(f"lemonade_{name}", doc)
            counter.add_metric([], value)
            yield counter
        for key, doc in (("exported", "Request spans sent to the OTLP endpoint."),
                         ("failed", "Request spans the OTLP endpoint did not take (down, slow, refusing).")):
            spans = CounterMetricFamily(f"inferos_telemetry_spans_{key}", doc)
            spans.add_metric([], self.telemetry().get(key, 0))
            yield spans
