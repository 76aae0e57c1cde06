"""GAIA's own ``LemonadeClient`` (``amd-gaia`` from PyPI, unchanged) against ``lemonade-server serve --plugin
inferos``: the calls a GAIA agent makes, a tool call among them."""

from __future__ import annotations

import json
import shutil

import pytest

from lemonade_inferos.bench.servers import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator_calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 24}},
                   "required": ["expression"]}}}


@pytest.fixture(scope="module")
def gaia(isolated_home_module, tmp_path_factory, monkeypatch_module):
    from gaia.llm.lemonade_client import LemonadeClient

    # GAIA finds Lemonade's command the way a pip-installed Lemonade is found: this host's lemonade-server
    monkeypatch_module.setenv("LEMONADE_SERVER_PATH", shutil.which("lemonade-server"))
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0",
                        env={"INFEROS_HOME": str(isolated_home_module)},
                        log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        yield LemonadeClient(model=MODEL, base_url=f"{base}/api/v1", verbose=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_gaia_sees_a_lemonade_server_with_the_model(gaia):
    assert gaia.health_check()["status"] == "ok"
    assert gaia.get_lemonade_version() == "11.7.0"
    status = gaia.get_status(include_catalog=False)
    assert status.running and status.version == "11.7.0"
    assert MODEL in [m["id"] for m in gaia.list_models()["data"]]
    assert gaia.check_model_available(MODEL)
    assert gaia.get_model_max_context_window(MODEL) == 8192
    assert gaia.load_model(MODEL, ctx_size=4096)["status"] == "success"
    assert gaia.check_model_loaded(MODEL)
    assert gaia.get_status(include_catalog=False).context_size == 4096


def test_gaia_chats_streamed_and_not_and_reads_the_stats(gaia):
    reply = gaia.chat_completions(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    assert reply["choices"][0]["message"]["content"]
    chunks = list(gaia.chat_completions(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                        max_tokens=8, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text
    stats = gaia.get_stats()
    assert stats["output_tokens"] > 0 and stats["time_to_first_token"] > 0
    assert gaia.completions(model=MODEL, prompt="Lemons are", max_tokens=3)["choices"][0]["text"]
    assert gaia.responses(model=MODEL, input="Hi", max_output_tokens=3)["status"] == "completed"


def test_gaia_reads_llama_cpp_timings_from_replies_streamed_and_not(gaia):
    from gaia.llm.providers.lemonade import LemonadeProvider

    provider = LemonadeProvider(model=MODEL, base_url=gaia.base_url)
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20},
                {"role": "user", "content": "Name a fruit."}]
    assert provider.chat(messages, max_tokens=8)
    first = provider.get_last_usage()
    assert first["tokens_per_second"] > 0   # timings.predicted_per_second: GAIA has no other decode rate
    assert "".join(provider.chat(messages, max_tokens=8, stream=True))
    again = provider.get_last_usage()
    assert again["tokens_per_second"] > 0 and again["cached_tokens"] > 0   # the same prompt: its prefix reused
    raw = gaia.chat_completions(model=MODEL, messages=messages, max_tokens=8)
    timings, usage = raw["timings"], raw["usage"]
    assert timings["cache_n"] + timings["prompt_n"] == usage["prompt_tokens"]
    assert timings["predicted_n"] == usage["completion_tokens"] and timings["prompt_ms"] > 0


def test_gaia_gets_a_tool_call_and_continues_with_its_result(gaia):
    # the schema bounds the expression (a client's own maxLength, enforced by the grammar): how long a 135M model
    # writes inside a free string depends on the CPU's rounding, and CI's once ran past max_tokens
    messages = [{"role": "user", "content": "What is 1+1? Use the calculator."}]
    first = gaia.chat_completions(model=MODEL, messages=messages, tools=[CALCULATOR], tool_choice="required",
                                  max_tokens=96)
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "calculator_calculate"
    assert isinstance(json.loads(call["function"]["arguments"]), dict)
    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "2"}]
    final = gaia.chat_completions(model=MODEL, messages=messages, tools=[CALCULATOR], tool_choice="none",
                                  max_tokens=24)
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["choices"][0]["message"]["content"]


def test_gaia_pulls_with_progress_and_unloads(gaia):
    events = list(gaia.pull_model_stream(MODEL))
    assert events[-1]["event"] == "complete" and events[-1]["percent"] == 100
    assert gaia.unload_model()["status"] == "success"
    assert not gaia.check_model_loaded(MODEL)
