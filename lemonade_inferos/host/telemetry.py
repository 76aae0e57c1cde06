"""OTLP traces of every generate call, as Lemonade's ``telemetry`` settings ask (its docs/guide/telemetry.md).

One span per request, with OpenInference attributes (``openinference.span.kind`` LLM, ``llm.model_name``,
``llm.token_count.*`` with the cached prompt tokens, ``input.value`` / ``output.value`` unless hidden) and/or
OpenTelemetry GenAI ones (``gen_ai.*``), plus what only this host knows (``inferos.*``: TTFT, engine, the KV
plan and what the cache measured). Spans go through opentelemetry-sdk's batch processor and OTLP/HTTP
exporter on its own thread: a collector that is down, slow or refusing costs a warning and a counted failure,
never a request. Settings arrive from ``POST /params`` or ``/internal/set`` as a partial ``telemetry`` block,
merged onto the current one and validated as a whole (a bad value is a 400 and changes nothing).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lemonade_inferos.errors import RequestError, validation_problems
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.host.reasoning import CLOSE, OPEN, ReasoningFormat

log = logging.getLogger(__name__)
REDACTED = "[REDACTED]"

# Lemonade's well-known headers, in its order of precedence (docs/guide/telemetry.md, "Session Tracking")
SESSION_HEADERS = ("x-opencode-session", "x-session-id", "x-client-session-id", "mcp-session-id",
                   "x-conversation-id", "session-id")
CLIENT_HEADERS = ("x-opencode-client", "x-client-id", "x-client-name")
NOT_APPLIED = {
    "otlp.max_retries": "opentelemetry-sdk's OTLP exporter retries transient errors with its own backoff inside "
                        "its export timeout; the count is not settable",
    "otlp.retry_backoff_base_s": "see otlp.max_retries",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OtlpSettings(_Strict):
    endpoint: str = "http://localhost:4318/v1/traces"
    protocol: str = "http/protobuf"
    semantics: list[Literal["openinference", "otel_genai"]] = Field(
        default_factory=lambda: ["openinference", "otel_genai"])
    headers: dict[str, str] = Field(default_factory=dict)
    max_retries: int = Field(0, ge=0)
    retry_backoff_base_s: float = Field(5.0, gt=0)
    send_batch_size: int = Field(100, ge=1)
    batch_timeout_s: float = Field(1.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("an http:// or https:// URL of an OTLP/HTTP traces receiver, e.g. "
                             "http://localhost:4318/v1/traces")
        return value

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        if value not in ("http/protobuf", "http/json"):
            raise ValueError("one of 'http/protobuf' or 'http/json'")
        return value


class SessionHeaders(_Strict):
    id: list[str] | str = Field(default_factory=list)
    client: list[str] | str = Field(default_factory=list)


class SessionSettings(_Strict):
    headers: SessionHeaders = Field(default_factory=SessionHeaders)


class TelemetrySettings(_Strict):
    enabled: bool = False
    hide_inputs: bool = False
    hide_outputs: bool = False
    hide_thinking: bool = False
    trust_incoming_trace_context: bool = False
    max_queue_capacity: int = Field(1000, ge=1)
    max_attribute_length: int = Field(4096, ge=16)
    otlp: OtlpSettings = Field(default_factory=OtlpSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)

    def captures(self) -> list[str]:
        return [name for name, hidden in (("inputs", self.hide_inputs), ("outputs", self.hide_outputs),
                                          ("thinking", self.hide_thinking)) if not hidden]


def _merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class RequestTrace:
    """What a route knows of a request that the span needs: its headers' trace context and session, the prompt
    as text (for ``input.value``) and the sampling parameters."""

    endpoint: str
    headers: Mapping[str, str] = field(default_factory=dict)
    input_text: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    output_parts: list[str] = field(default_factory=list)
    session_id: str | None = None   # the body's ``session_id``: it wins over every header
    user_id: str | None = None      # the body's user (OpenAI ``user``, Anthropic ``metadata.user_id``)
    reasoning: ReasoningFormat | None = None   # a reasoning model's: where the reply's thinking is

    def output_text(self, hide_thinking: bool) -> str:
        """The reply as generated; ``hide_thinking``: a reasoning model's thinking replaced by ``[REDACTED]``."""
        output = "".join(self.output_parts)
        if not hide_thinking or self.reasoning is None:
            return output
        thinking, answer = self.reasoning.split(output)
        return output if thinking is None else f"{OPEN}{REDACTED}{CLOSE}{answer}"


class _CountingExporter:
    """The OTLP exporter, counting what it sent and what failed (for /health and Prometheus)."""

    def __init__(self, inner: Any, counts: dict[str, int]) -> None:
        self.inner, self.counts = inner, counts

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # the SDK's worker must keep running whatever the collector does
            log.warning("OTLP export failed: %r", exc)
            result = SpanExportResult.FAILURE
        key = "exported" if result == SpanExportResult.SUCCESS else "failed"
        self.counts[key] += len(spans)
        if key == "failed":
            log.warning("OTLP export of %d spans to %s failed", len(spans), getattr(self.inner, "_endpoint", "?"))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Telemetry:
    """The host's trace pipeline: off until settings enable it; rebuilt when they change."""

    def __init__(self, service_version: str) -> None:
        self.settings = TelemetrySettings()
        self.service_version = service_version
        self.counts = {"exported": 0, "failed": 0, "dropped": 0}
        self._provider: Any = None
        self._tracer: Any = None
        self._lock = threading.Lock()

    def update(self, changes: Mapping[str, Any]) -> TelemetrySettings:
        """Merge a partial ``telemetry`` block onto the current settings and apply them.

        Raises:
            RequestError: a key Lemonade does not define, or a value of the wrong type or range.
        """
        if not isinstance(changes, Mapping):
            raise RequestError("telemetry must be an object", param="telemetry")
        try:
            settings = TelemetrySettings.model_validate(_merged(self.settings.model_dump(), changes))
        except ValidationError as exc:
            problems = validation_problems(exc, "telemetry.")
            raise RequestError("telemetry settings rejected: " + "; ".join(f"{p['field']}: {p['problem']}"
                                                                          for p in problems),
                               problems=problems) from None
        with self._lock:
            old, self._provider, self._tracer = self._provider, None, None
            self.settings = settings
            if settings.enabled:
                self._provider, self._tracer = self._pipeline(settings)
        if old is not None:  # flushing to a dead collector can take its timeout: not on the request's time
            threading.Thread(target=old.shutdown, name="otlp-shutdown", daemon=True).start()
        log.info("telemetry %s%s", "enabled, exporting to " if settings.enabled else "disabled",
                 settings.otlp.endpoint if settings.enabled else "")
        return settings

    def _pipeline(self, settings: TelemetrySettings) -> tuple[Any, Any]:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "lemonade-server",
                                                            "service.version": self.service_version}),
                                  span_limits=SpanLimits(max_attribute_length=settings.max_attribute_length),
                                  shutdown_on_exit=False)
        if settings.otlp.protocol == "http/json":
            from lemonade_inferos.host.otlp_json import OTLPJsonSpanExporter
            exporter = OTLPJsonSpanExporter(settings.otlp.endpoint, settings.otlp.headers, timeout=10)
        else:
            exporter = OTLPSpanExporter(endpoint=settings.otlp.endpoint, headers=dict(settings.otlp.headers),
                                        timeout=10)
        provider.add_span_processor(BatchSpanProcessor(
            _CountingExporter(exporter, self.counts), max_queue_size=settings.max_queue_capacity,
            schedule_delay_millis=settings.otlp.batch_timeout_s * 1000,
            max_export_batch_size=min(settings.otlp.send_batch_size, settings.max_queue_capacity)))
        return provider, provider.get_tracer("lemonade_inferos.host")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def record(self, stats: InferenceStats, trace: RequestTrace | None, notes: Mapping[str, Any]) -> None:
        """Export one span for a finished request; never raises."""
        tracer, settings = self._tracer, self.settings
        if tracer is None or trace is None:
            return
        try:
            parent = self._parent(trace.headers) if settings.trust_incoming_trace_context else None
            start = stats.end_unix - stats.latency_s
            span = tracer.start_span(trace.endpoint.replace("/", "."), context=parent,   # Lemonade's chat.completions
                                     start_time=int(start * 1e9), attributes=self._attributes(stats, trace, notes))
            if stats.error:
                from opentelemetry.trace import Status, StatusCode
                span.set_status(Status(StatusCode.ERROR, stats.error[:200]))
            span.end(end_time=int(stats.end_unix * 1e9))
        except Exception:
            log.exception("building the request's span failed; the request is unaffected")

    def record_refused(self, trace: RequestTrace, model: str | None, status: int, code: str, message: str,
                       start_unix: float) -> None:
        """Export one span for a request refused before it ran (an unknown model, a prompt the context cannot
        hold, a full queue): no tokens, the HTTP status and the error's code. Never raises."""
        tracer = self._tracer
        if tracer is None:
            return
        try:
            from opentelemetry.trace import Status, StatusCode

            parent = self._parent(trace.headers) if self.settings.trust_incoming_trace_context else None
            attrs: dict[str, Any] = {"llm.usage.prompt_tokens": 0, "llm.usage.completion_tokens": 0,
                                     "llm.usage.total_tokens": 0, "http.response.status_code": status,
                                     "error.type": code, "inferos.error_kind": "request"}
            if model:
                attrs.update({"llm.model_name": model, "gen_ai.request.model": model})
            session = self._session_id(trace)
            if session:
                attrs["session.id"] = session
            if trace.user_id:
                attrs["user.id"] = trace.user_id
            span = tracer.start_span(trace.endpoint.replace("/", "."), context=parent,
                                     start_time=int(start_unix * 1e9), attributes=attrs)
            span.set_status(Status(StatusCode.ERROR, message[:200]))
            span.end()
        except Exception:
            log.exception("building a refused request's span failed; the answer is unaffected")

    def _attributes(self, stats: InferenceStats, trace: RequestTrace, notes: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.settings
        semantics = set(settings.otlp.semantics)
        attrs: dict[str, Any] = {}
        output = trace.output_text(settings.hide_thinking)
        session = self._session_id(trace)
        if "openinference" in semantics:
            from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes as OI
            attrs.update({OI.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.LLM.value,
                          OI.LLM_SYSTEM: "lemonade", OI.LLM_PROVIDER: "lemonade", OI.LLM_MODEL_NAME: stats.model,
                          OI.LLM_TOKEN_COUNT_PROMPT: stats.prompt_n, OI.LLM_TOKEN_COUNT_COMPLETION: stats.predicted_n,
                          OI.LLM_TOKEN_COUNT_TOTAL: stats.prompt_n + stats.predicted_n,
                          OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ: stats.cache_n,
                          OI.LLM_INVOCATION_PARAMETERS: json.dumps(trace.parameters)})
            if stats.finish_reason:
                attrs[OI.LLM_FINISH_REASON] = stats.finish_reason
            # hidden, the attribute says so (Lemonade's "[REDACTED]"): a viewer can tell hidden from empty
            if settings.hide_inputs or trace.input_text is not None:
                attrs.update({OI.INPUT_VALUE: REDACTED if settings.hide_inputs else trace.input_text,
                              OI.INPUT_MIME_TYPE: "text/plain"})
            attrs.update({OI.OUTPUT_VALUE: REDACTED if settings.hide_outputs else output,
                          OI.OUTPUT_MIME_TYPE: "text/plain"})
            if session:
                attrs[OI.SESSION_ID] = session
            if trace.user_id:
                attrs[OI.USER_ID] = trace.user_id
        if "otel_genai" in semantics:
            attrs.update({"gen_ai.system": "lemonade", "gen_ai.operation.name": trace.endpoint,
                          "gen_ai.request.model": stats.model, "gen_ai.response.model": stats.model,
                          "gen_ai.response.id": stats.request_id, "gen_ai.usage.input_tokens": stats.prompt_n,
                          "gen_ai.usage.output_tokens": stats.predicted_n,
                          "gen_ai.usage.cache_read.input_tokens": stats.cache_n})
            if stats.finish_reason:
                attrs["gen_ai.response.finish_reasons"] = [stats.finish_reason]
            for key in ("temperature", "top_p", "max_tokens"):
                if trace.parameters.get(key) is not None:
                    attrs[f"gen_ai.request.{key}"] = trace.parameters[key]
            if session:
                attrs["gen_ai.conversation.id"] = session
            if trace.user_id:
                attrs["enduser.id"] = trace.user_id
        attrs.update({"llm.usage.prompt_tokens": stats.prompt_n, "llm.usage.completion_tokens": stats.predicted_n,
                      "llm.usage.total_tokens": stats.prompt_n + stats.predicted_n})   # Lemonade's, any semantics
        attrs.update(_scalars("inferos", {
            "engine": stats.engine, "baseline": stats.baseline, "ttft_ms": _ms(stats.ttft_s),
            "prompt_ms": stats.prompt_ms, "decode_tokens_per_second": stats.predicted_per_second,
            "queue_wait_ms": _ms(stats.queue_wait_s), "drafted_tokens": stats.drafted_n,
            "accepted_tokens": stats.accepted_n, "error_kind": stats.error_kind}))
        attrs.update(_scalars("inferos.kv", stats.kv.to_dict() if stats.kv is not None else {}))
        if stats.fallback_from_error is not None:
            attrs["inferos.fallback_from_error"] = stats.fallback_from_error
        attrs.update(_scalars("inferos.plan", notes))
        return attrs

    @staticmethod
    def _parent(headers: Mapping[str, str]) -> Any:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        carrier = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
        return TraceContextTextMapPropagator().extract(carrier) if "traceparent" in carrier else None

    def _session_id(self, trace: RequestTrace) -> str | None:
        """Lemonade's resolution: the body's ``session_id``, then the configured session headers, then the
        well-known ones; prefixed ``<client>/`` when a configured or well-known client header names the client."""
        lowered = {k.lower(): v for k, v in trace.headers.items()}
        session = trace.session_id or _first(lowered, self.settings.session.headers.id, SESSION_HEADERS)
        client = _first(lowered, self.settings.session.headers.client, CLIENT_HEADERS)
        return f"{client}/{session}" if session and client else session

    def flush(self, timeout_s: float = 10.0) -> bool:
        provider = self._provider
        return True if provider is None else bool(provider.force_flush(int(timeout_s * 1000)))

    def health(self) -> dict[str, Any]:
        """Lemonade's ``/health`` ``telemetry`` block, with what was exported and what is not applied."""
        block: dict[str, Any] = {"enabled": self.enabled}
        if self.enabled:
            block["captures"] = self.settings.captures()
            block["endpoint"] = self.settings.otlp.endpoint
        block["inferos"] = {"spans_exported": self.counts["exported"], "spans_failed": self.counts["failed"],
                            "not_applied": NOT_APPLIED}
        return block

    def shutdown(self) -> None:
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            threading.Thread(target=provider.shutdown, name="otlp-shutdown", daemon=True).start()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """OTLP attributes take scalars (and lists of them): nested values are flattened, None dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_scalars(f"{prefix}.{key}", value))
        elif isinstance(value, (str, bool, int, float)):
            out[f"{prefix}.{key}"] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
            out[f"{prefix}.{key}"] = [str(v) for v in value] if len({type(v) for v in value}) > 1 else list(value)
    return out


def _first(lowered: Mapping[str, str], configured: list[str] | str, known: Sequence[str]) -> str | None:
    """The first of the configured headers, then of the well-known ones, that the request carries."""
    names = ([configured] if isinstance(configured, str) else list(configured)) + list(known)
    return next((lowered[n.lower()] for n in names if lowered.get(n.lower())), None)
