"""Auth, restarts and the lemonade-server command line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import openai

from .conftest import free_port, running_server

MODEL = "SmolLM2-135M-Instruct-CPU"


def test_api_key_is_required_when_set(model_dir):
    with running_server("--plugin", "inferos", env={"LEMONADE_API_KEY": "s3cret"}) as base:
        denied = httpx.get(f"{base}/api/v1/health")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{base}/api/v1/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{base}/live").status_code == 200
        reply = openai.OpenAI(base_url=f"{base}/api/v1", api_key="s3cret").chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices


def test_a_restart_on_the_same_port_does_not_break_clients(model_dir):
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key="x", max_retries=5)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with running_server("--plugin", "inferos", port=port):
        before = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=messages)
    with running_server("--plugin", "inferos", port=port):
        after = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=messages)
    assert after.choices[0].message.content == before.choices[0].message.content


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", *args],
                          capture_output=True, text=True, timeout=120)


def test_unknown_plugin_is_refused_with_a_clear_message(model_dir):
    result = _cli("serve", "--plugin", "nosuch", "--port", str(free_port()))
    assert result.returncode == 1
    assert "no plugin named 'nosuch'" in result.stderr and "inferos" in result.stderr


def test_list_shows_the_default_model_installed(model_dir):
    result = _cli("list")
    assert result.returncode == 0 and MODEL in result.stdout


def test_status_reports_a_stopped_server():
    result = _cli("status", "--port", str(free_port()))
    assert result.returncode == 1 and "not running" in result.stdout


READ_ONLY_COMMANDS = [("lemonade_server", "list"), ("lemonade_server", "status"), ("lemonade_server", "--version"),
                      ("inferos", "model", "list"), ("inferos", "config", "show"), ("inferos", "config", "path"),
                      ("inferos", "service", "show"), ("inferos", "service", "status"), ("inferos", "dashboard"),
                      ("inferos", "metrics"), ("inferos", "policy", "get")]


def test_read_only_commands_create_nothing_in_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFEROS_", "XDG_"))}
    env.update(HOME=str(home), INFEROS_AGENT_PORT=str(free_port()))  # no server there: the commands say so
    for module, *args in READ_ONLY_COMMANDS:
        if args == ["status"]:
            args += ["--port", str(free_port())]
        result = subprocess.run([sys.executable, "-m", f"lemonade_inferos.cli.{module}", *args], env=env,
                                capture_output=True, text=True, timeout=120)
        assert "Traceback" not in result.stderr and "Usage:" not in result.stderr, (args, result.stderr)
        created = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        assert created == [], f"{module} {' '.join(args)} created {created}"


def test_a_busy_control_port_is_reported_and_another_servers_endpoints_are_never_advertised(model_dir, tmp_path):
    with socket.socket() as holder:  # another process's control API on the port this server is told to use
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"INFEROS_RANDOM_PORT": "false", "INFEROS_AGENT_PORT": str(port)}
        with running_server("--plugin", "inferos", env=env, log_path=tmp_path / "server.log") as base:
            inferos = httpx.get(f"{base}/api/v1/health").json()["inferos"]
            assert inferos["control_api"] is None
            assert f"127.0.0.1:{port}" in inferos["control_api_error"] and "INFEROS_AGENT_PORT" in inferos[
                "control_api_error"]
            reply = httpx.post(f"{base}/api/v1/chat/completions", timeout=120, json={
                "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200  # serving goes on without the control API
    log = (tmp_path / "server.log").read_text()
    assert "serving without a control API" in log and "Traceback" not in log
