"""The controller keeps its word, on real servers: presets run as configured, plugin config edits reach the next
request, a sidecar agent steers two servers, a stalled generation is caught, and the plugin can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lemonade_inferos.bench.servers import free_port, running_server
from lemonade_inferos.config.files import PRESETS_DIR, load_config

FORCED_HERE = {"device", "thread_policy"}   # what this CPU machine forces: no DirectML/NPU; a busy machine
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}


def _control(base: str) -> str:
    return httpx.get(f"{base}/api/v1/health").json()["inferos"]["control_api"]["url"]


def _wait(condition, timeout_s: float = 10.0, what: str = "the condition"):
    deadline = time.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"{what} did not hold within {timeout_s} s"
        time.sleep(0.1)


def _token(home: Path) -> str:
    return os.environ.get("INFEROS_AGENT_TOKEN") or (home / "agent-token").read_text().strip()


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS_DIR.iterdir()))
def test_each_preset_runs_as_configured_where_nothing_forces_an_override(calibrated_model, preset, tmp_path):
    path = PRESETS_DIR / preset
    with running_server("--plugin", "inferos", "--config", str(path), "--inferos-prefix-spill-mb", "0",
                        log_path=tmp_path / "server.log") as base:
        assert httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
        document = httpx.get(f"{_control(base)}/policy").json()
    preset_policy = load_config(path).policy.model_dump()
    assert document["configured"] == preset_policy
    assert {o["source"] for o in document["overrides"]} <= FORCED_HERE, document["overrides"]
    effective = document["effective"]
    for phase in ("prefill_device", "decode_device"):   # the one thing this machine changes: no DML, no NPU
        effective["scheduler"][phase] = preset_policy["scheduler"][phase]
    assert effective == preset_policy
    assert str(path) in document["layers"]


def test_a_plugin_config_edit_changes_the_next_requests_plan_and_a_bad_edit_changes_nothing(calibrated_model,
                                                                                           tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    user_copy = config_dir / "plugin.toml"
    user_copy.write_text('[plugin.config]\nkv_mode = "dynamic"\nshadow_every = 0\n')
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env={"INFEROS_CONFIG_DIR": str(config_dir)},
                        log_path=tmp_path / "server.log") as base:
        control = _control(base)
        httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120)
        assert httpx.get(f"{control}/metrics").json()["optimization_status"]["last_run"]["plan"] == "dynamic"
        user_copy.write_text('[plugin.config]\nkv_mode = "quality_optimized"\nshadow_every = 0\n')
        _wait(lambda: httpx.get(f"{control}/policy").json()["configured"]["kv"]["mode"] == "quality_optimized",
              what="the reload of the edited plugin config")
        httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120)
        assert httpx.get(f"{control}/metrics").json()["optimization_status"]["last_run"]["plan"] == \
            "quality_optimized"
        user_copy.write_text('[plugin.config]\nkv_mode = "quality_optimized"\n\nrecent_window = 3\n')
        error = _wait(lambda: httpx.get(f"{control}/config").json()["last_error"], what="the rejection")
        assert error["source"] == str(user_copy) and error["line"] == 4 and error["field"] == "kv.recent_window"
        policy = httpx.get(f"{control}/policy").json()
        assert policy["configured"]["kv"]["recent_window"] == 64 and policy["configured"]["kv"]["mode"] == \
            "quality_optimized"
        assert httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120).status_code == 200


def test_one_sidecar_agent_steers_two_servers_and_sees_their_stats(isolated_home, tmp_path):
    env = {"INFEROS_HOME": str(isolated_home)}
    agent_port = free_port()
    agent = subprocess.Popen([sys.executable, "-m", "lemonade_inferos.cli.inferos", "agent", "--port",
                              str(agent_port)], env={**os.environ, **env, "INFEROS_RANDOM_PORT": "false"},
                             stdout=open(tmp_path / "agent.log", "w"), stderr=subprocess.STDOUT)
    agent_url = f"http://127.0.0.1:{agent_port}/v1"
    try:
        _wait(lambda: _answers(f"{agent_url}/health"), 60, "the agent's start")
        server_env = {**env, "INFEROS_AGENT_URL": f"http://127.0.0.1:{agent_port}"}
        with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env=server_env,
                            log_path=tmp_path / "a.log") as first, \
                running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env=server_env,
                               log_path=tmp_path / "b.log") as second:
            headers = {"X-Inferos-Token": _token(isolated_home)}
            assert httpx.post(f"{agent_url}/policy", json={"kv": {"recent_window": 96}}, headers=headers,
                              timeout=10).status_code == 200
            for base in (first, second):
                document = _wait(lambda b=base: _policy_from_agent(b), 15, "the agent's policy on a server")
                assert document["configured"]["kv"]["recent_window"] == 96
                assert httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
            metrics = _wait(lambda: _with_servers(agent_url, 2), 15, "both servers' stats at the agent")
            assert metrics["totals"]["requests"] >= 2 and metrics["tps"] is not None
    finally:
        agent.terminate()
        agent.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _policy_from_agent(base: str):
    document = httpx.get(f"{_control(base)}/policy").json()
    return document if document["source"].startswith("agent") else None


def _with_servers(agent_url: str, count: int):
    metrics = httpx.get(f"{agent_url}/metrics").json()
    return metrics if len(metrics["servers"]) >= count else None


def test_a_stalled_generation_ends_with_a_clear_error_and_the_next_runs_on_the_baseline(calibrated_model, tmp_path):
    # a watchdog longer than any short request's first token on a slow, busy machine (1 s), shorter than the long
    # prompt's prefill on a fast one (~2,800 tokens: >= 2 s even at fp32 speed)
    long_prompt = {"messages": [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps. " * 420}],
                   "max_tokens": 4}
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", "--inferos-watchdog-s", "1.0",
                        log_path=tmp_path / "server.log") as base:
        httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120)   # the engine is built (not timed)
        response = httpx.post(f"{base}/api/v1/chat/completions", json=long_prompt, timeout=120)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "generation_stalled"
        assert httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
        assert httpx.get(f"{base}/api/v1/stats").json()["inferos"]["engine"] == "og"   # the backoff's baseline
        metrics = httpx.get(f"{_control(base)}/metrics").json()
        assert metrics["optimization_status"]["fallbacks"]["backoff"]["timeout"]["attempts"] == 1
        events = httpx.get(f"{_control(base)}/history", params={"kind": "fallback"}).json()["history"]
        assert events[-1]["event"] == "generation_stalled" and events[-1]["reason"] == "timeout"
    assert "the inferos engine was discarded" in (tmp_path / "server.log").read_text()


def test_inferos_enabled_false_serves_without_the_plugin(calibrated_model, tmp_path):
    with running_server("--plugin", "inferos", env={"INFEROS_ENABLED": "false"},
                        log_path=tmp_path / "server.log") as base:
        health = httpx.get(f"{base}/api/v1/health").json()["inferos"]
        assert health["mode"] == "baseline" and health["plugins"] == [] and "inferos" in health["disabled_plugins"]
        assert httpx.post(f"{base}/api/v1/chat/completions", json=CHAT, timeout=120).status_code == 200


@pytest.mark.parametrize("args,message", [
    (["--inferos-recent-window", "3"], "plugin option kv.recent_window: Input should be greater than or equal to 16"),
    (["--plugin-option", "inferos.kv.mode=fastest"], "kv.mode"),
    (["--inferos-prefix-cache-gb", "1"], "prefix_cache_gb"),
    (["--prefix-cache-mb", "1"], "no such option"),
    (["--plugin-option", "other.kv.mode=dynamic"], "NAME.KEY=VALUE"),
])
def test_a_bad_plugin_option_stops_the_server_with_the_option_named(model_dir, args, message):
    out = subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--port",
                          str(free_port()), "--plugin", "inferos", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stdout + out.stderr, out.stdout + out.stderr


def test_the_design_documents_monitor_loop_reads_the_metrics(plugin_server):
    httpx.post(f"{plugin_server}/api/v1/chat/completions", json=CHAT, timeout=120)
    metrics = httpx.get(f"{_control(plugin_server)}/metrics").json()
    line = (f"TPS: {metrics['tps']:.1f}, FTL: {metrics['ftl_ms']:.1f}ms, "
            f"VRAM: {metrics['mem']['vram_gb']:.1f}GB, NPU: {metrics['util']['npu']:.1%}, "
            f"iGPU: {metrics['util']['igpu']:.1%}")
    assert line.startswith("TPS: ")
    summary = httpx.get(f"{_control(plugin_server)}/metrics", params={"view": "summary"}).json()
    assert set(summary) == {"timestamp", "tps", "ftl_ms", "mem", "util", "quality", "kv_stats"}
    assert set(summary["kv_stats"]) == {"total_chunks", "level_distribution", "compression_ratio", "hit_rate"}
    assert httpx.get(f"{_control(plugin_server)}/metrics", params={"view": "x"}).status_code == 400
