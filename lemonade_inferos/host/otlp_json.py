"""OTLP/HTTP with JSON bodies (Lemonade's ``telemetry.otlp.protocol: "http/json"``).

opentelemetry-sdk's Python exporters speak protobuf only. The request is the same message either way: the SDK's
own encoder builds it and protobuf's JSON mapping writes it, with OTLP/JSON's two differences applied (trace and
span ids as hex strings, not base64; enums as integers), then it is posted as ``application/json``.
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Mapping, Sequence

import requests
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)
ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The OTLP/JSON ``ExportTraceServiceRequest`` of ``spans``."""
    return _hex_ids(MessageToDict(encode_spans(spans), use_integers_for_enums=True))


def _hex_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: base64.b64decode(item).hex() if key in ID_FIELDS and isinstance(item, str) else _hex_ids(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_hex_ids(item) for item in value]
    return value


class OTLPJsonSpanExporter(SpanExporter):
    def __init__(self, endpoint: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
        self._endpoint, self._timeout = endpoint, timeout
        self._session = requests.Session()
        self._session.headers.update({**(headers or {}), "Content-Type": "application/json"})

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            reply = self._session.post(self._endpoint, json=otlp_json(spans), timeout=self._timeout)
        except requests.RequestException as exc:
            log.warning("OTLP/JSON export to %s failed: %s", self._endpoint, exc)
            return SpanExportResult.FAILURE
        if not reply.ok:
            log.warning("OTLP/JSON export to %s answered %d: %s", self._endpoint, reply.status_code, reply.text[:200])
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._session.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
