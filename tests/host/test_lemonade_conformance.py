"""Where Lemonade defines a behaviour, the host answers as Lemonade does (its docs/api/lemonade.md and openai.md)."""

from __future__ import annotations

import json

import httpx

ASK = [{"role": "user", "content": "Hi"}]


def _sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_streamed_request_whose_prompt_overflows_gets_the_error_in_the_stream(plugin_server):
    body = {"messages": [{"role": "user", "content": "hello " * 9000}], "stream": True, "max_tokens": 4}
    response = httpx.post(f"{plugin_server}/api/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response)
    assert len(events) == 1 and events[0]["error"]["code"] == "context_length_exceeded"
    plain = httpx.post(f"{plugin_server}/api/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "context_length_exceeded"


def test_a_streamed_request_with_a_malformed_body_gets_the_error_in_the_stream(plugin_server):
    for path, body in (("/chat/completions", {"messages": "not a list", "stream": True}),
                       ("/completions", {"prompt": "x", "max_tokens": 0, "stream": True})):
        response = httpx.post(f"{plugin_server}/api/v1{path}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert _sse_events(response)[0]["error"]["code"] == "invalid_request"


def test_model_name_prefixes_and_deleting_an_unknown_model(plugin_server):
    builtin = httpx.post(f"{plugin_server}/api/v1/chat/completions", timeout=120,
                         json={"model": "builtin.SmolLM2-135M-Instruct-CPU", "messages": ASK, "max_tokens": 2})
    assert builtin.status_code == 200 and builtin.json()["model"] == "SmolLM2-135M-Instruct-CPU"
    extra = httpx.post(f"{plugin_server}/api/v1/chat/completions", timeout=60,
                       json={"model": "extra.some-model.gguf", "messages": ASK, "max_tokens": 2})
    # no GGUF of that name in an extra_models_dir (there is none here): not in the registry, as Lemonade answers
    assert extra.status_code == 404 and extra.json()["error"]["code"] == "model_not_found"
    missing = httpx.post(f"{plugin_server}/api/v1/delete", json={"model_name": "user.never-registered"}, timeout=60)
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "model_not_found"


def test_a_long_prefill_streams_ping_comments_until_the_first_token(calibrated_model, tmp_path):
    from lemonade_inferos.bench.servers import running_server

    body = {"messages": [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps. " * 220}],
            "stream": True, "max_tokens": 2}
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env={"LEMONADE_SSE_PING_S": "0.1"},
                        log_path=tmp_path / "server.log") as base:
        httpx.post(f"{base}/api/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}, timeout=120)
        with httpx.stream("POST", f"{base}/api/v1/chat/completions", json=body, timeout=120) as response:
            lines = [line for line in response.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data > 0 and all(line == ": ping" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"
