"""Anthropic's Messages API with the real ``anthropic`` SDK against the plugin's server: plain, streamed, a tool
call and its result, token counting, and the same greedy reply as the OpenAI route."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct-CPU"
CALCULATOR = {"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}},
                               "required": ["expression"]}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}   # the SDK has no temperature argument any more; the API does


@pytest.fixture(scope="module")
def client(plugin_server):
    return anthropic.Anthropic(base_url=plugin_server, api_key="unused", max_retries=0)


def test_a_message_is_text_blocks_with_usage_and_the_openai_routes_greedy_reply(client, plugin_server):
    reply = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=QUESTION,
                                   system="You are a geography teacher.")
    assert reply.type == "message" and reply.role == "assistant" and reply.content[0].type == "text"
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.usage.output_tokens > 0
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > 10
    same = openai.OpenAI(base_url=f"{plugin_server}/v1", api_key="unused").chat.completions.create(
        model=MODEL, max_tokens=16, extra_body=GREEDY,
        messages=[{"role": "system", "content": "You are a geography teacher."}, *QUESTION])
    assert reply.content[0].text == same.choices[0].message.content


def test_a_streamed_message_is_anthropics_event_sequence(client):
    with client.messages.stream(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=QUESTION) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    plain = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=QUESTION)
    assert final.content[0].text == plain.content[0].text and final.usage.output_tokens == plain.usage.output_tokens


def test_a_tool_use_and_its_result_round_trip(client):
    messages = [{"role": "user", "content": "What is 1+1? Use the calculator."}]
    first = client.messages.create(model=MODEL, max_tokens=64, extra_body=GREEDY, messages=messages, tools=[CALCULATOR],
                                   tool_choice={"type": "any"})
    use = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use" and use.name == "calculator" and isinstance(use.input, dict)
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "2"}]}]
    final = client.messages.create(model=MODEL, max_tokens=24, extra_body=GREEDY, messages=messages, tools=[CALCULATOR],
                                   tool_choice={"type": "none"})
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].text
    with client.messages.stream(model=MODEL, max_tokens=64, extra_body=GREEDY, messages=messages[:1],
                                tools=[CALCULATOR], tool_choice={"type": "any"}) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content if b.type == "tool_use"] and streamed.stop_reason == "tool_use"


def test_tokens_are_counted_without_generating_and_bad_requests_are_400(client, plugin_server):
    counted = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    reply = client.messages.create(model=MODEL, max_tokens=2, extra_body=GREEDY, messages=QUESTION)
    assert counted.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    for bad in ({"model": MODEL, "messages": QUESTION},                                   # no max_tokens
                {"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
                {"model": MODEL, "max_tokens": 4, "messages": QUESTION, "tool_choice": {"type": "maybe"},
                 "tools": [CALCULATOR]}):
        assert httpx.post(f"{plugin_server}/v1/messages", json=bad, timeout=60).status_code == 400, bad
    assert httpx.post(f"{plugin_server}/api/messages", json={"model": MODEL, "max_tokens": 2, "messages": QUESTION},
                      timeout=60).json()["type"] == "message"
