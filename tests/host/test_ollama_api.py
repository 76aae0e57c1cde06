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
    assert f"{MODEL}:latest" in [m.model for m in client.list().models]   # Ollama's tag, as Lemonade lists them
    client.chat(model=f"{MODEL}:latest", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert f"{MODEL}:latest" in [m.model for m in client.ps().models]


def test_show_describes_a_model_and_authoring_routes_are_not_supported(client, plugin_server):
    shown = client.show(f"{MODEL}:latest")
    assert "completion" in shown.capabilities and shown.details.family and shown.modelfile.startswith("#")
    for call in (lambda: client.copy(MODEL, "copy-of-it"), lambda: client.push(MODEL),
                 lambda: client.create(model="new", from_=MODEL)):
        with pytest.raises(ollama.ResponseError) as raised:
            call()
        assert raised.value.status_code == 501
    assert httpx.post(f"{plugin_server}/api/show", json={"model": "no-such-model"}).status_code == 404


def test_pull_streams_ollamas_status_lines_and_an_unknown_model_is_a_404(client, plugin_server):
    statuses = [part.status for part in client.pull(f"{MODEL}:latest", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.pull(MODEL).status == "success"
    with pytest.raises(ollama.ResponseError) as raised:
        client.pull("no-such-model")
    assert raised.value.status_code == 404


def test_a_chat_without_a_model_is_a_400(plugin_server):
    reply = httpx.post(f"{plugin_server}/api/chat", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 400 and reply.json()["error"]["code"]


def test_options_the_openai_shape_refuses_are_a_400_naming_them_on_both_routes(plugin_server):
    five = {"model": MODEL, "options": {"stop": ["a", "b", "c", "d", "e"]}}
    for route, body in (("/api/generate", {**five, "prompt": "Hi"}),
                        ("/api/chat", {**five, "messages": [{"role": "user", "content": "Hi"}]})):
        reply = httpx.post(f"{plugin_server}{route}", json=body, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["details"]["param"] == "stop", route


def test_keep_alive_zero_with_nothing_to_run_unloads_the_model(client):
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})
    assert f"{MODEL}:latest" in [m.model for m in client.ps().models]
    reply = client.chat(model=MODEL, messages=[], keep_alive=0)
    assert reply.done and reply.done_reason == "unload"
    assert f"{MODEL}:latest" not in [m.model for m in client.ps().models]
    assert client.generate(model=MODEL, prompt="", keep_alive="0s").done_reason == "unload"


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
