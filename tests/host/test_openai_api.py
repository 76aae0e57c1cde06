"""The host as GAIA, the openai client and curl see it."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct-CPU"


@pytest.fixture
def client(plugin_server):
    return openai.OpenAI(base_url=f"{plugin_server}/api/v1", api_key="unused")


def test_chat_completion_returns_text_and_usage(client):
    reply = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    extra = reply.usage.model_extra
    assert extra["decoding_speed_tps"] > 0 and extra["prefill_duration_ttft"] > 0


def test_streaming_chat_ends_with_usage_in_the_last_chunk(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.prompt_tokens_details.cached_tokens >= 0


def test_a_stream_asked_for_usage_ends_with_a_usage_chunk_without_choices_as_openai_sends_it(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    finish, last = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason in ("stop", "length") and finish.usage is None
    assert last.choices == [] and 0 < last.usage.completion_tokens <= 8
    timings = last.model_extra["timings"]   # llama.cpp's, beside the usage
    assert timings["prompt_n"] + timings["cache_n"] == last.usage.prompt_tokens
    assert timings["predicted_n"] == last.usage.completion_tokens and timings["predicted_per_second"] > 0


def test_gaias_penalties_each_act_on_a_greedy_reply(client):
    def reply(**extra):
        return client.chat.completions.create(
            model=MODEL, max_tokens=32, temperature=0, messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
            **extra).choices[0].message.content

    plain = reply()
    assert reply(frequency_penalty=1.5) != plain and reply(presence_penalty=1.5) != plain
    assert reply(extra_body={"repeat_penalty": 1.8}) != plain
    assert reply(extra_body={"repeat_penalty": 1.8, "presence_penalty": 1.5, "repeat_last_n": 0}) == plain   # off


def test_streaming_and_plain_greedy_replies_are_identical(client):
    messages = [{"role": "user", "content": "Name two planets."}]
    plain = client.chat.completions.create(model=MODEL, max_tokens=20, temperature=0, messages=messages)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, max_tokens=20, temperature=0, messages=messages, stream=True) if c.choices)
    assert streamed == plain.choices[0].message.content


def test_completions_endpoint(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 5


def test_responses_endpoint_text_in_text_out(plugin_server):
    body = httpx.post(f"{plugin_server}/api/v1/responses", timeout=60,
                      json={"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 16}).json()
    assert body["object"] == "response" and body["status"] == "completed"
    assert "Paris" in body["output"][0]["content"][0]["text"]
    assert body["usage"]["output_tokens"] > 0


def test_second_turn_reuses_the_first_turns_kv(client, plugin_server):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 20},
                {"role": "user", "content": "List three fruits."}]
    first = client.chat.completions.create(model=MODEL, max_tokens=32, temperature=0, messages=messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And three vegetables?"}]
    second = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, messages=messages)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.6 * second.usage.prompt_tokens
    stats = httpx.get(f"{plugin_server}/api/v1/stats").json()
    assert stats["cache_tokens"] == cached
    assert stats["input_tokens"] == stats["prompt_tokens"] - cached


def test_the_next_turn_reuses_the_finished_sequence_token_exactly(client):
    messages = [{"role": "user", "content": "Write one sentence about lighthouses, please."}]
    first = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=messages)
    again = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=messages)
    # the warm cache holds the whole prompt (the prefix store alone would stop at a 32-token block boundary)
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_sampled_requests_publish_a_shadow_quality_estimate_on_the_control_api(client, plugin_server):
    control = httpx.get(f"{plugin_server}/api/v1/health").json()["inferos"]["control_api"]["url"]

    def samples() -> int:
        return httpx.get(f"{control}/metrics").json()["quality"]["delta_ppl_est"]["measurement"]["samples"]

    before = samples()
    system = {"role": "system", "content": "You are a careful assistant who explains things step by step. " * 12}
    for question in ("Why do leaves change colour?", "How do tides work?", "What makes bread rise?"):
        client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                       messages=[system, {"role": "user", "content": question}])
    # the server runs it once it has been idle for a moment (the fixture samples every 3rd request)
    deadline = time.monotonic() + 60
    while samples() == before and time.monotonic() < deadline:
        time.sleep(0.5)
    estimate = httpx.get(f"{control}/metrics").json()["quality"]["delta_ppl_est"]
    assert estimate["measurement"]["samples"] > before
    assert estimate["current"] is not None


def test_concurrent_chats_sharing_a_system_prompt_each_get_their_own_answer(client):
    system = {"role": "system", "content": "You answer with one short sentence."}
    questions = ["What is 2+2?", "What colour is the sky?", "Who wrote Hamlet?", "What is ice made of?"]

    def ask(question):
        return client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                              messages=[system, {"role": "user", "content": question}])

    sequential = [ask(q).choices[0].message.content for q in questions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        concurrent_replies = [r.choices[0].message.content for r in pool.map(ask, questions)]
    assert concurrent_replies == sequential


def test_health_reports_a_parseable_lemonade_version_and_loaded_models(plugin_server):
    health = httpx.get(f"{plugin_server}/api/v1/health").json()
    assert health["status"] == "ok"
    assert tuple(int(p) for p in health["version"].split(".")) >= (10, 2, 0)
    assert health["model_loaded"] == MODEL and health["checkpoint_loaded"]
    assert health["all_models_loaded"][0]["recipe_options"]["ctx_size"] > 0
    assert health["inferos"]["plugins"] == ["inferos"]


def test_models_listing_and_lookup(plugin_server):
    listing = httpx.get(f"{plugin_server}/v1/models").json()
    assert MODEL in [m["id"] for m in listing["data"]]
    assert httpx.get(f"{plugin_server}/api/v0/models/{MODEL}").json()["recipe"] == "oga-cpu"


def _error(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "details" in error and error["type"]


def test_unknown_model_is_404_in_the_error_shape(plugin_server):
    _error(httpx.post(f"{plugin_server}/api/v1/chat/completions",
                      json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
           404, "model_not_found")
    _error(httpx.get(f"{plugin_server}/api/v1/models/no-such-model"), 404, "model_not_found")


def test_bad_json_is_400(plugin_server):
    _error(httpx.post(f"{plugin_server}/api/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}), 400, "invalid_json")


def test_negative_max_tokens_is_400(plugin_server):
    _error(httpx.post(f"{plugin_server}/api/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
           400, "invalid_request")


def test_prompt_over_the_context_is_400(plugin_server):
    _error(httpx.post(f"{plugin_server}/api/v1/completions", timeout=60,
                      json={"prompt": "hello " * 9000, "max_tokens": 4}), 400, "context_length_exceeded")


def test_empty_messages_is_400(plugin_server):
    _error(httpx.post(f"{plugin_server}/api/v1/chat/completions", json={"messages": []}), 400, "invalid_request")


def test_server_keeps_serving_after_bad_requests(client):
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content


def test_a_client_that_disconnects_mid_stream_loses_nothing_for_the_next_one(client, plugin_server):
    messages = [{"role": "system", "content": "You are a patient teacher. " * 10},
                {"role": "user", "content": "Explain how a bicycle stays upright."}]

    def ask(max_tokens: int = 40):
        return client.chat.completions.create(model=MODEL, max_tokens=max_tokens, temperature=0, messages=messages)

    def unrelated():  # takes the warm slot, so the next request restores from the prefix store
        client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Name a prime number."}])

    ask()
    unrelated()
    expected = ask()  # restored from the store: what any later request should see
    unrelated()
    body = {"model": MODEL, "messages": messages, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{plugin_server}/api/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]  # a few chunks, then hang up
    unrelated()
    again = ask()
    assert again.choices[0].message.content == expected.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == expected.usage.prompt_tokens_details.cached_tokens > 0
    assert httpx.get(f"{plugin_server}/api/v1/health").json()["status"] == "ok"


def test_prometheus_metrics_parse(plugin_server):
    text = httpx.get(f"{plugin_server}/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"lemonade_server_up", "inferos_requests", "inferos_cache_tokens"} <= names


def test_baseline_server_without_plugin_runs_og_generator(baseline_server):
    client = openai.OpenAI(base_url=f"{baseline_server}/api/v1", api_key="unused")
    reply = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    stats = httpx.get(f"{baseline_server}/api/v1/stats").json()
    assert stats["inferos"]["engine"] == "og" and stats["inferos"]["baseline"] is True
    assert httpx.get(f"{baseline_server}/api/v1/health").json()["inferos"]["mode"] == "baseline"


def test_plugin_and_baseline_give_the_same_greedy_reply(plugin_server, baseline_server):
    # a system prompt of its own: no earlier request shares a block of this prompt, so both prefill it cold
    messages = [{"role": "system", "content": "Parity check 7f3a: answer plainly."},
                {"role": "user", "content": "Write one sentence about the sea."}]
    replies = [openai.OpenAI(base_url=f"{base}/api/v1", api_key="x").chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0, messages=messages).choices[0].message.content
        for base in (plugin_server, baseline_server)]
    assert replies[0] == replies[1]
