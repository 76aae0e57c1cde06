"""A reasoning model's thinking is told apart from its answer (``<think>...</think>`` at the start of a reply, or the
whole reply when the template opened the tag), however the reply is cut into chunks, and every API carries it in its
own field: OpenAI's ``reasoning_content``, the Responses API's reasoning item, Anthropic's ``thinking`` blocks and
Ollama's ``thinking``."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from lemonade_inferos.host.reasoning import CONTENT, REASONING, ReasoningFormat
from lemonade_inferos.host.telemetry import RequestTrace

WHOLE = [
    ("<think>plan it</think>\n\nThe answer.", False, ("plan it", "The answer.")),
    ("  <think>a<b</think>b", False, ("a<b", "b")),
    ("No thinking here, even <think>later</think>.", False, (None, "No thinking here, even <think>later</think>.")),
    ("still thinking", True, ("still thinking", "")),
    ("thought</think> said", True, ("thought", "said")),
    ("<thi", False, (None, "<thi")),
    ("<think>cut off at </thi", False, ("cut off at </thi", "")),
]


@pytest.mark.parametrize("text, inside, expected", WHOLE)
def test_a_whole_reply_splits_into_thinking_and_answer(text, inside, expected):
    assert ReasoningFormat(starts_inside=inside).split(text) == expected


@pytest.mark.parametrize("text, inside, expected", WHOLE)
def test_a_streamed_reply_splits_the_same_wherever_the_chunks_are_cut(text, inside, expected):
    for cuts in [list(range(1, len(text)))] + [[i] for i in range(1, len(text))]:
        splitter = ReasoningFormat(starts_inside=inside).splitter()
        pieces = []
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            pieces += splitter.feed(text[start:end])
        pieces += splitter.flush()
        thinking = "".join(t for kind, t in pieces if kind == REASONING)
        answer = "".join(t for kind, t in pieces if kind == CONTENT)
        assert ((thinking if splitter.thought else None), answer) == expected, cuts


def test_only_a_template_that_knows_the_tag_makes_a_reasoning_model():
    assert ReasoningFormat.of("{{ messages }}", "prompt", None) is None
    thinking_template = "{{ '<think>' }}"
    assert ReasoningFormat.of(thinking_template, "<|assistant|>\n<think>\n", None).starts_inside
    assert not ReasoningFormat.of(thinking_template, "<|assistant|>\n", None).starts_inside
    assert ReasoningFormat.of(thinking_template, "<|assistant|>\n<think>\n", "none") is None


def test_a_span_hides_the_thinking_only_when_telemetry_is_told_to():
    trace = RequestTrace("chat/completions", output_parts=["pla", "n</think> Answer."],
                         reasoning=ReasoningFormat(starts_inside=True))
    assert trace.output_text(hide_thinking=True) == "<think>[REDACTED]</think>Answer."
    assert trace.output_text(hide_thinking=False) == "plan</think> Answer."
    plain = RequestTrace("chat/completions", output_parts=["Answer."], reasoning=ReasoningFormat())
    assert plain.output_text(hide_thinking=True) == "Answer.", "a reply without thinking has nothing to hide"


THINKS = "user.SmolLM2-Thinks"
OPENS_THINK = "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is not defined or enable_thinking %}" \
              "{{ '<think>\n' }}{% else %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"


@pytest.fixture(scope="module")
def server(isolated_plugin_server, calibrated_model, tmp_path_factory):
    """SmolLM2 under a template that opens ``<think>`` for the reply, as Qwen3's does: every token it generates
    is thinking, and the greedy tokens are the same as with the tags kept in the text."""
    folder = tmp_path_factory.mktemp("thinks") / "smollm2-thinks"
    folder.mkdir()
    for item in Path(calibrated_model).iterdir():
        if item.name != "chat_template.jinja":
            (folder / item.name).symlink_to(item)
    template = (Path(calibrated_model) / "chat_template.jinja").read_text()
    assert "{{ '<|im_start|>assistant\n' }}" in template
    (folder / "chat_template.jinja").write_text(template.replace("{{ '<|im_start|>assistant\n' }}", OPENS_THINK))
    reply = httpx.post(f"{isolated_plugin_server}/api/v1/pull", json={"model_name": THINKS, "checkpoint": str(folder)},
                       timeout=600)
    assert reply.status_code == 200, reply.text
    return isolated_plugin_server


MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def tagged_text(server):
    """The greedy reply with the tags kept in the text (``reasoning_format: none``)."""
    reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=300, json={
        "model": THINKS, "messages": MESSAGES, "max_tokens": 12, "reasoning_format": "none"}).json()
    assert "reasoning_content" not in reply["choices"][0]["message"]
    text = reply["choices"][0]["message"]["content"]
    assert text.strip() and "</think>" not in text, "twelve greedy tokens of thinking that never close"
    return text


def test_openai_chat_carries_the_thinking_as_reasoning_content(server, tagged_text):
    client = openai.OpenAI(base_url=f"{server}/api/v1", api_key="lemonade")
    reply = client.chat.completions.create(model=THINKS, messages=MESSAGES, max_tokens=12)
    message = reply.model_dump()["choices"][0]["message"]
    assert message["reasoning_content"] == tagged_text and message["content"] == ""
    streamed = client.chat.completions.create(model=THINKS, messages=MESSAGES, max_tokens=12, stream=True)
    deltas = [c.model_dump()["choices"][0]["delta"] for c in streamed if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == tagged_text
    assert not "".join(d.get("content") or "" for d in deltas)


def test_a_template_told_not_to_think_gives_a_plain_answer(server):
    reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=300, json={
        "model": THINKS, "messages": MESSAGES, "max_tokens": 8,
        "chat_template_kwargs": {"enable_thinking": False}}).json()
    message = reply["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]


def test_the_responses_api_puts_the_thinking_in_a_reasoning_item(server, tagged_text):
    reply = httpx.post(f"{server}/api/v1/responses", timeout=300,
                       json={"model": THINKS, "input": MESSAGES[0]["content"], "max_output_tokens": 12}).json()
    assert reply["output"][0]["type"] == "reasoning"
    assert reply["output"][0]["content"][0]["text"] == tagged_text
    with httpx.stream("POST", f"{server}/api/v1/responses", timeout=300, json={
            "model": THINKS, "input": MESSAGES[0]["content"], "max_output_tokens": 12, "stream": True}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == tagged_text


def test_anthropic_messages_carry_thinking_blocks_plain_and_streamed(server, tagged_text):
    client = anthropic.Anthropic(base_url=server, api_key="lemonade")
    message = client.messages.create(model=THINKS, max_tokens=12, messages=MESSAGES)
    assert message.content[0].type == "thinking" and message.content[0].thinking == tagged_text
    with client.messages.stream(model=THINKS, max_tokens=12, messages=MESSAGES) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(kinds) == {"thinking_delta"} and final.content[0].thinking == tagged_text


def test_ollama_chat_carries_the_thinking_and_think_false_turns_it_off(server, tagged_text):
    client = ollama.Client(host=server)
    reply = client.chat(model=THINKS, messages=MESSAGES, options={"num_predict": 12})
    assert reply.message.thinking == tagged_text and reply.message.content == ""
    streamed = "".join(part.message.thinking or "" for part in
                       client.chat(model=THINKS, messages=MESSAGES, options={"num_predict": 12}, stream=True))
    assert streamed == tagged_text
    plain = client.chat(model=THINKS, messages=MESSAGES, options={"num_predict": 8}, think=False)
    assert not plain.message.thinking and plain.message.content
