"""Ollama's API with the real ``ollama`` client library against the plugin's server."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import ollama
import pytest

MODEL = "SmolLM2-135M-Instruct-CPU"


@pytest.fixture(scope="module")
def client(plugin_server):
    return ollama.Client(host=plugin_server, timeout=120)


def test_version_tags_and_ps(client, plugin_server):
    assert httpx.get(f"{plugin_server}/api/version").json()["version"]
    assert MODEL in [m.model for m in client.list().models]
    client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert MODEL in [m.model for m in client.ps().models]


def test_chat_unstreamed_and_streamed_reports_ollamas_counts(client):
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat(model=MODEL, messages=messages, options={"num_predict": 8, "temperature": 0})
    assert reply.done and reply.message.content and reply.eval_count >= 1 and reply.prompt_eval_count > 5
    assert reply.total_duration > 0 and reply.done_reason in ("stop", "length")
    parts = list(client.chat(model=MODEL, messages=messages, stream=True, options={"num_predict": 8,
                                                                                    "temperature": 0}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == reply.message.content   # greedy: the same reply


def test_generate_with_a_json_schema_format_and_chat_tool_calls(client):
    schema = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 40}}}
    reply = client.generate(model=MODEL, prompt="Name a city as JSON.", format=schema, options={"num_predict": 40})
    jsonschema_rs.validate(schema, json.loads(reply.response))
    tool = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string"}}}}}
    streamed = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "Time in Oslo? Use get_time."}],
                                tools=[tool], stream=True, options={"num_predict": 60}))
    calls = [c for part in streamed for c in (part.message.tool_calls or [])]
    if calls:  # auto: the model may answer in text; a call, when made, is Ollama's shape with object arguments
        assert calls[0].function.name == "get_time" and isinstance(calls[0].function.arguments, dict)
    else:
        assert "".join(p.message.content for p in streamed)
