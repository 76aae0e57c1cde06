"""Tool calls and structured output with the real ``openai`` client against real servers (plugin and baseline)."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema_rs
import openai
import pytest

from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.host import tools

MODEL = "SmolLM2-135M-Instruct-CPU"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator_calculate", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "What is 1+1? Use the calculator."}]


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/api/v1", api_key="unused", max_retries=0)


def _check_call(call, tool) -> dict:
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema_rs.validate(tool["function"]["parameters"], arguments)
    return arguments


def test_a_required_tool_call_round_trip_works_unstreamed(plugin_server):
    client = _client(plugin_server)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[CALCULATOR], tool_choice="required",
                                           max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _check_call(call, CALCULATOR)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "2"}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[CALCULATOR], tool_choice="none",
                                           max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens_details.cached_tokens > 0   # the tool turn reuses the conversation's prefix


def test_a_streamed_tool_call_is_reassembled_by_the_openai_client(plugin_server):
    stream = _client(plugin_server).chat.completions.create(
        model=MODEL, messages=ASK, tools=[CALCULATOR, WEATHER], tool_choice="required", max_tokens=80, stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            calls.setdefault(part.index, part)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and not content
    call = calls[0]
    _check_call(call, {"calculator_calculate": CALCULATOR, "get_weather": WEATHER}[call.function.name])


def test_a_named_tool_choice_calls_that_tool_and_auto_answers_text_or_a_valid_call(plugin_server):
    client = _client(plugin_server)
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=[CALCULATOR, WEATHER], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    _check_call(named.choices[0].message.tool_calls[0], WEATHER)
    for question in ("What is the capital of France?", "What is 1+1? Use the calculator."):
        auto = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              tools=[CALCULATOR], max_tokens=60)
        message = auto.choices[0].message
        if message.tool_calls:
            assert auto.choices[0].finish_reason == "tool_calls"
            _check_call(message.tool_calls[0], CALCULATOR)
        else:
            assert message.content and not message.content.startswith("<")


@pytest.mark.parametrize("body,code", [
    ({"tools": [CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "invalid_tools"),
    ({"tool_choice": "required"}, "invalid_tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "invalid_response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "invalid_response_format"),
    ({"response_format": {"type": "xml"}}, "invalid_response_format"),
])
def test_bad_tools_and_formats_are_400_before_anything_runs(plugin_server, body, code):
    response = httpx.post(f"{plugin_server}/api/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text


CITY = {"type": "object", "additionalProperties": False, "required": ["name", "country", "population"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                       "population": {"type": "integer", "minimum": 0}}}
TOPICS = ["Paris", "a small village", "the largest city you know", "a city in Japan", "a fictional town", "Rome",
          "a coastal city", "a desert city", "a mountain town", "your favourite city"]


def test_json_schema_replies_always_validate_over_50_prompts(plugin_server):
    client = _client(plugin_server)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for index in range(50):
        prompt = f"Describe {TOPICS[index % len(TOPICS)]} as JSON (variant {index // len(TOPICS)})."
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               response_format=fmt, max_tokens=120, temperature=0.7, seed=index)
        jsonschema_rs.validate(CITY, json.loads(reply.choices[0].message.content))


def test_json_object_and_the_responses_api_text_format(plugin_server):
    client = _client(plugin_server)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A JSON object with a person's name and age."}],
        response_format={"type": "json_object"}, max_tokens=300)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    response = client.responses.create(model=MODEL, input="Describe Paris as JSON.", max_output_tokens=120,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
    jsonschema_rs.validate(CITY, json.loads(response.output_text))


def test_the_baseline_engine_accepts_the_same_constrained_requests(baseline_server):
    client = _client(baseline_server)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Rome as JSON"}],
                                           response_format=fmt, max_tokens=120)
    jsonschema_rs.validate(CITY, json.loads(reply.choices[0].message.content))
    call = client.chat.completions.create(model=MODEL, messages=ASK, tools=[CALCULATOR], tool_choice="required",
                                          max_tokens=80).choices[0].message.tool_calls[0]
    _check_call(call, CALCULATOR)


QWEN_STYLE_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool.function | tojson }}
{%- endfor %}
</tools>
Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


BOUNDED_WEATHER = {"type": "function", "function": {   # random weights never close a free string: enums only
    "name": "get_weather", "parameters": {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
                                          "properties": {
        "city": {"enum": ["Oslo", "Rome"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


def test_a_template_with_native_tools_gets_them_and_any_architecture_calls_validly(tiny_models, tmp_path):
    """A random-weight Qwen3 with a Qwen-style template: the template renders the tools and the earlier call (its
    arguments as an object), and the constrained reply is a valid call whatever the weights say."""
    folder = tmp_path / "qwen3"
    shutil.copytree(tiny_models["qwen3"], folder)
    (folder / "chat_template.jinja").write_text(QWEN_STYLE_TEMPLATE)
    engine = OrtEngine(folder, SessionPolicy(devices=["cpu"]))
    template = engine.tokenizer.chat_template
    assert tools.native_tools(template) and tools.syntax_of(template) == "hermes"
    setup = tools.setup([BOUNDED_WEATHER], "required", template)
    earlier = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    messages = tools.render_messages([{"role": "user", "content": "Weather?"},
                                      {"role": "assistant", "content": "", "tool_calls": [earlier]},
                                      {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
                                      {"role": "user", "content": "And in Rome?"}], [BOUNDED_WEATHER], native=True)
    prompt = engine.tokenizer.apply_chat_template(messages, tools=[BOUNDED_WEATHER])
    assert '"name": "get_weather"' in prompt and '{"city": "Oslo", "unit": "celsius"}' in prompt.replace("\n", "")
    text = "".join(c.text for c in engine.generate(engine.tokenizer.encode(prompt),
                                                    SamplingParams(max_tokens=120, guidance=setup.guidance)))
    content, calls = tools.parse(text, setup)
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather", text
    jsonschema_rs.validate(BOUNDED_WEATHER["function"]["parameters"], json.loads(calls[0]["function"]["arguments"]))
