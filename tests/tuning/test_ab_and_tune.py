"""``--inferos-record``, token-id completions, ``inferos ab`` and ``inferos tune`` against a real server."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from click.testing import CliRunner

from lemonade_inferos.bench.servers import running_server
from lemonade_inferos.cli.inferos import cli
from lemonade_inferos.config.policy import deep_merge
from tests.conftest import control_url

MODEL = "SmolLM2-135M-Instruct-CPU"
TOKEN = "tuning-test-token-0123456789"


@pytest.fixture(scope="module")
def server(isolated_home_module, tmp_path_factory):
    record = tmp_path_factory.mktemp("record") / "workload.jsonl"
    env = {"INFEROS_HOME": str(isolated_home_module), "INFEROS_AGENT_TOKEN": TOKEN}
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", "--inferos-record", str(record),
                        env=env, log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        yield base, record


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", TOKEN)


def _configured(base: str) -> dict:
    return httpx.get(f"{control_url(base)}/policy").json()["configured"]


def test_the_server_records_what_it_serves_and_a_token_id_prompt_replays_it_exactly(server):
    base, record = server
    chat = httpx.post(f"{base}/api/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 6, "temperature": 0.5, "seed": 7,
        "messages": [{"role": "user", "content": "Name a fruit."}]}).json()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    last = lines[-1]
    assert last["endpoint"] == "chat/completions" and last["max_tokens"] == 6
    assert last["sampling"]["temperature"] == 0.5 and last["sampling"]["seed"] == 7
    assert len(last["prompt_ids"]) == chat["usage"]["prompt_tokens"]
    replay = httpx.post(f"{base}/api/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": last["prompt_ids"], "max_tokens": 6, "temperature": 0.5, "seed": 7}).json()
    assert replay["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    assert replay["choices"][0]["text"] == chat["choices"][0]["message"]["content"]  # same prompt, same seed
    bad = httpx.post(f"{base}/api/v1/completions", json={"model": MODEL, "prompt": [1, 10**9], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["param"] == "prompt"


def test_inferos_ab_measures_each_candidate_and_restores_the_configured_policy(server, token, tmp_path):
    base, record = server
    before = _configured(base)
    latency = tmp_path / "latency.yaml"
    latency.write_text(yaml.safe_dump({"infer_os": {"kv": {"mode": "latency_optimized"}}}))
    no_spec = tmp_path / "no-spec.yaml"
    no_spec.write_text(yaml.safe_dump({"speculative": {"mode": "off"}}))
    out = tmp_path / "ab.json"
    result = CliRunner().invoke(cli, ["ab", "--server", base, "--policy", str(latency), "--policy", str(no_spec),
                                      "--workload", str(record), "--repeats", "1", "--eval-context", "64",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    ab = json.loads(out.read_text())
    assert [t["name"] for t in ab["trials"]] == ["configured", "latency", "no-spec"]
    for trial in ab["trials"]:
        assert trial["metrics"]["requests"] > 0 and trial["metrics"]["throughput"]["tokens_per_second"] > 0
        assert isinstance(trial["delta_ppl"], float)  # from the server's quality evaluation of that plan
        assert trial["evaluation"]["plan"]
    assert ab["chosen"] in ("configured", "latency", "no-spec") and "ΔPPL" in ab["reason"]
    assert _configured(base) == before  # restored: no --apply


def test_a_bad_candidate_file_is_refused_before_anything_changes(server, token, tmp_path):
    base, _ = server
    before = httpx.get(f"{control_url(base)}/policy").json()["version"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kv": {"recent_window": 5}}))
    result = CliRunner().invoke(cli, ["ab", "--server", base, "--policy", str(bad), "--workload", "conversation"])
    assert result.exit_code != 0 and "recent_window" in result.output
    assert httpx.get(f"{control_url(base)}/policy").json()["version"] == before


def test_inferos_tune_ends_no_slower_than_the_configured_policy_inside_the_budget_and_says_why(server, token,
                                                                                              tmp_path):
    base, _ = server
    out = tmp_path / "tune.json"
    result = CliRunner().invoke(cli, ["tune", "--server", base, "--workload", "conversation", "--max-tokens", "16",
                                      "--repeats", "1", "--max-trials", "3", "--eval-context", "64", "--apply",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    tuned = json.loads(out.read_text())
    assert len(tuned["trials"]) == 3 and tuned["trials"][0]["name"] == "configured"
    assert tuned["stopped"] == "stopped after 3 trials (--max-trials)"
    chosen, reference = tuned["chosen"], tuned["reference"]
    assert chosen["metrics"]["throughput"]["tokens_per_second"] >= reference["metrics"]["throughput"]["tokens_per_second"]
    assert chosen["delta_ppl"] <= 0.1 and chosen["reason"]
    assert len(tuned["steps"]) == 3 and "chosen:" in result.output
    # --apply: the choice is what the server now runs with
    assert _configured(base) == deep_merge(tuned["configured"], chosen["update"])
