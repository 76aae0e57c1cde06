"""Lemonade's telemetry: with /params' telemetry block enabled, every request is one OTLP span with
OpenInference attributes, received here by a real OTLP/HTTP receiver (protobuf over HTTP, as Arize Phoenix or
an OpenTelemetry Collector take it); bad settings are 400s; a collector that is down never fails a request."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)


MODEL = "SmolLM2-135M-Instruct-CPU"


class Receiver:
    """An OTLP/HTTP traces endpoint: keeps every span it is sent, with the headers that came with it."""

    def __init__(self) -> None:
        self.spans: list = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers["Content-Type"] == "application/json":   # OTLP/JSON: ids in hex
                    request = json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), ExportTraceServiceRequest())
                else:
                    request = ExportTraceServiceRequest.FromString(body)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(scope_spans.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _hex_ids_to_base64(value):
    """OTLP/JSON writes trace and span ids in hex where protobuf's JSON mapping has base64."""
    if isinstance(value, dict):
        return {k: base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId")
                else _hex_ids_to_base64(v) for k, v in value.items()}
    return [_hex_ids_to_base64(v) for v in value] if isinstance(value, list) else value


def _attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def server(isolated_plugin_server):
    return isolated_plugin_server


def _telemetry(server: str, block: dict) -> httpx.Response:
    return httpx.post(f"{server}/api/v1/params", json={"telemetry": block}, timeout=30)


def test_each_request_exports_one_span_with_openinference_attributes(server, receiver):
    on = _telemetry(server, {"enabled": True, "trust_incoming_trace_context": True,
                             "otlp": {"endpoint": receiver.url, "headers": {"x-project-name": "inferos"},
                                      "batch_timeout_s": 0.2}})
    assert on.status_code == 200, on.text
    assert httpx.get(f"{server}/api/v1/health", timeout=30).json()["telemetry"]["captures"] == \
        ["inputs", "outputs", "thinking"]
    system = {"role": "system", "content": "You answer in one short sentence. " * 12}
    replies, stats = [], []
    for question in ("What is a lemon?", "What is a lime?"):
        reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=120, headers={
            "x-session-id": "chat-7", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            json={"model": MODEL, "messages": [system, {"role": "user", "content": question}], "max_tokens": 12})
        replies.append(reply.json()["choices"][0]["message"]["content"])
        stats.append(httpx.get(f"{server}/api/v1/stats", timeout=30).json())
    assert httpx.post(f"{server}/internal/telemetry/flush", timeout=60).json()["status"] == "flushed"

    assert len(receiver.spans) == 2 and receiver.headers[-1]["x-project-name"] == "inferos"
    for span, reply, stat, question in zip(receiver.spans, replies, stats, ("lemon", "lime")):
        a = _attributes(span)
        assert a["openinference.span.kind"] == "LLM" and a["llm.model_name"] == MODEL
        assert a["llm.token_count.prompt"] == stat["prompt_tokens"]
        assert a["llm.token_count.completion"] == stat["output_tokens"]
        assert a["llm.token_count.prompt_details.cache_read"] == stat["cache_tokens"]
        assert a["gen_ai.usage.input_tokens"] == stat["prompt_tokens"]
        assert a["inferos.ttft_ms"] == pytest.approx(stat["time_to_first_token"] * 1000, rel=1e-3)
        assert a["inferos.engine"] == "inferos" and question in a["input.value"] and a["output.value"] == reply
        assert a["session.id"] == "chat-7" and span.end_time_unix_nano > span.start_time_unix_nano
        assert span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736", "the caller's traceparent is honoured"
        assert any(key.startswith("inferos.kv.") for key in a), "the KV plan and what the cache measured"
    assert _attributes(receiver.spans[1])["llm.token_count.prompt_details.cache_read"] > 0

    hidden = _telemetry(server, {"hide_inputs": True, "hide_outputs": True})
    assert hidden.status_code == 200
    httpx.post(f"{server}/api/v1/completions", json={"model": MODEL, "prompt": "Lemons are", "max_tokens": 3},
               timeout=120)
    httpx.post(f"{server}/internal/telemetry/flush", timeout=60)
    last = _attributes(receiver.spans[-1])
    assert last["input.value"] == last["output.value"] == "[REDACTED]" and last["llm.token_count.completion"] == 3
    assert receiver.spans[-1].name == "completions" and receiver.spans[0].name == "chat.completions"
    assert last["llm.usage.completion_tokens"] == 3 and last["llm.usage.prompt_tokens"] > 0
    _telemetry(server, {"enabled": False, "hide_inputs": False, "hide_outputs": False})


def test_a_request_refused_before_it_runs_exports_an_error_span(server, receiver):
    assert _telemetry(server, {"enabled": True, "otlp": {"endpoint": receiver.url, "batch_timeout_s": 0.2}}) \
        .status_code == 200
    before = len(receiver.spans)
    missing = httpx.post(f"{server}/api/v1/chat/completions", headers={"x-session-id": "chat-9"}, timeout=60,
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert missing.status_code == 404
    too_long = httpx.post(f"{server}/api/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "lemon " * 9000, "max_tokens": 2})
    assert too_long.status_code == 400
    bad_body = httpx.post(f"{server}/api/v1/chat/completions", timeout=60, json={"model": MODEL, "messages": "Hi"})
    assert bad_body.status_code == 400
    assert httpx.post(f"{server}/api/v1/params", json={"temperature": "hot"}, timeout=30).status_code == 400
    assert httpx.post(f"{server}/internal/telemetry/flush", timeout=60).json()["status"] == "flushed"
    spans = receiver.spans[before:]
    assert [s.name for s in spans] == ["chat.completions", "completions", "chat.completions"], \
        "a generate body its schema refused has its span; /params is no generate request"
    first, second, third = (_attributes(s) for s in spans)
    assert third["error.type"] == "invalid_request" and third["llm.model_name"] == MODEL
    assert first["http.response.status_code"] == 404 and first["error.type"] == "model_not_found"
    assert first["llm.model_name"] == "no-such-model" and first["session.id"] == "chat-9"
    assert second["http.response.status_code"] == 400 and second["llm.usage.completion_tokens"] == 0
    assert all(s.status.code == 2 for s in spans), "both spans carry the ERROR status"
    _telemetry(server, {"enabled": False})


def test_sessions_resolve_as_lemonade_does_body_first_then_configured_then_known_headers_with_the_client(
        server, receiver):
    assert _telemetry(server, {"enabled": True, "session": {"headers": {"id": ["x-corp-session"]}},
                               "otlp": {"endpoint": receiver.url, "batch_timeout_s": 0.2}}).status_code == 200
    before = len(receiver.spans)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for headers, extra in (({"x-session-id": "from-header", "x-client-name": "vscode"},
                            {"session_id": "from-body", "user": "alice"}),
                           ({"x-session-id": "known", "x-corp-session": "configured"}, {}),
                           ({"session-id": "last-known"}, {})):
        reply = httpx.post(f"{server}/api/v1/chat/completions", json={**chat, **extra}, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
    httpx.post(f"{server}/internal/telemetry/flush", timeout=60)
    spans = [_attributes(s) for s in receiver.spans[before:]]
    assert [a["session.id"] for a in spans] == ["vscode/from-body", "configured", "last-known"]
    assert spans[0]["gen_ai.conversation.id"] == "vscode/from-body" and spans[0]["user.id"] == "alice"
    assert "user.id" not in spans[1]
    _telemetry(server, {"enabled": False, "session": {"headers": {"id": []}}})


def test_http_json_exports_the_same_spans_as_json_with_hex_ids_and_otel_genai_alone_exports_its_attributes(
        server, receiver):
    assert _telemetry(server, {"enabled": True, "trust_incoming_trace_context": True,
                               "otlp": {"endpoint": receiver.url, "protocol": "http/json", "semantics": ["otel_genai"],
                                        "batch_timeout_s": 0.2}}).status_code == 200
    before = len(receiver.spans)
    reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=120,
                       headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200
    assert httpx.post(f"{server}/internal/telemetry/flush", timeout=60).json()["status"] == "flushed"
    assert receiver.headers[-1]["content-type"] == "application/json"
    [span] = receiver.spans[before:]
    a = _attributes(span)
    assert span.name == "chat.completions" and span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.usage.output_tokens"] == 2
    assert "openinference.span.kind" not in a and "input.value" not in a, "otel_genai only"
    _telemetry(server, {"enabled": False, "otlp": {"protocol": "http/protobuf",
                                                   "semantics": ["openinference", "otel_genai"]}})


def test_a_full_batch_is_exported_without_waiting_for_the_batch_timeout(server, receiver):
    assert _telemetry(server, {"enabled": True, "otlp": {"endpoint": receiver.url, "send_batch_size": 3,
                                                         "batch_timeout_s": 60}}).status_code == 200
    before = len(receiver.spans)
    for _ in range(3):
        httpx.post(f"{server}/api/v1/completions", json={"model": MODEL, "prompt": "Lemons", "max_tokens": 1},
                   timeout=120).raise_for_status()
    deadline = time.time() + 5
    while len(receiver.spans) < before + 3 and time.time() < deadline:
        time.sleep(0.1)
    assert len(receiver.spans) == before + 3, "three spans fill a batch of three: sent at once, no flush asked"
    _telemetry(server, {"enabled": False, "otlp": {"send_batch_size": 100, "batch_timeout_s": 1.0}})


def test_bad_telemetry_settings_are_400_and_change_nothing(server, receiver):
    _telemetry(server, {"enabled": False})
    for block in ({"enabled": "yes"}, {"otlp": {"endpoint": "ftp://collector"}}, {"verbose": True},
                  {"otlp": {"protocol": "grpc"}}, {"otlp": {"headers": {"x": 1}}}, {"max_queue_capacity": 0},
                  "on"):
        response = _telemetry(server, block)
        assert response.status_code == 400, block
        assert response.json()["error"]["code"] == "invalid_request"
    assert httpx.get(f"{server}/api/v1/health", timeout=30).json()["telemetry"]["enabled"] is False
    mixed = httpx.post(f"{server}/api/v1/params", json={"temperature": 0.5, "telemetry": {"enabled": 1}}, timeout=30)
    assert mixed.status_code == 400
    assert "temperature" not in httpx.post(f"{server}/api/v1/params", json={}, timeout=30).json()["params"]
    refused = httpx.post(f"{server}/internal/set", json={"telemetry": {"enabled": "true"}}, timeout=30)
    assert refused.status_code == 400


def test_a_collector_that_is_down_never_fails_a_request(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"   # nothing listens once the socket closes
    assert _telemetry(server, {"enabled": True, "otlp": {"endpoint": dead, "batch_timeout_s": 0.1}}).status_code == 200
    for _ in range(3):
        reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=120,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert reply.status_code == 200
    httpx.post(f"{server}/internal/telemetry/flush", timeout=60)
    health = httpx.get(f"{server}/api/v1/health", timeout=30).json()["telemetry"]
    assert health["inferos"]["spans_failed"] >= 3
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    failed = next(line for line in metrics.splitlines() if line.startswith("inferos_telemetry_spans_failed_total "))
    assert float(failed.split()[1]) == health["inferos"]["spans_failed"]
    _telemetry(server, {"enabled": False})
