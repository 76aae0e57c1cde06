"""Loopback is not a boundary by itself: what a web page the user opens, or DNS rebinding, can no longer do."""

from __future__ import annotations

import stat

import httpx

from lemonade_inferos.controller.auth import read_token_file, token_file

from ..conftest import control_url
from .conftest import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"
PAGE = {"Origin": "http://evil.example", "Content-Type": "text/plain"}  # what a cross-site form/fetch sends


def test_a_web_page_cannot_unload_or_delete_the_model(plugin_server, model_dir):
    api = f"{plugin_server}/api/v1"
    for path in ("unload", "delete", "params", "load"):
        response = httpx.post(f"{api}/{path}", headers=PAGE, content=f'{{"model_name": "{MODEL}"}}')
        assert response.status_code == 403 and response.json()["error"]["code"] == "cross_origin_forbidden"
    no_origin_form = httpx.post(f"{api}/unload", headers={"Content-Type": "text/plain"}, content=b"{}")
    assert no_origin_form.status_code == 415
    assert httpx.get(f"{api}/health").json()["model_loaded"] == MODEL
    assert (model_dir / "model.onnx").is_file()
    control = control_url(plugin_server)
    token = read_token_file(token_file())
    refused = httpx.post(f"{control}/baseline", headers={**PAGE, "X-Inferos-Token": token}, content=b'{"enable": true}')
    assert refused.status_code == 403
    assert httpx.get(f"{control}/health").json()["baseline_mode"] is False


def test_dns_rebinding_host_names_are_refused_on_both_ports(plugin_server):
    control = control_url(plugin_server)
    for url in (f"{plugin_server}/api/v1/health", f"{control}/metrics"):
        assert httpx.get(url, headers={"Host": "evil.example"}).status_code == 400
        assert httpx.get(url, headers={"Host": "localhost"}).status_code == 200


def test_a_loopback_page_may_still_use_the_api(plugin_server):
    reply = httpx.post(f"{plugin_server}/api/v1/chat/completions", timeout=60,
                       headers={"Origin": "http://localhost:5173"},
                       json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200


def test_the_token_is_checked_before_the_body_is_read(plugin_server, model_dir):
    control = control_url(plugin_server)
    malformed = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    assert httpx.post(f"{control}/policy", **malformed).status_code == 401
    assert httpx.post(f"{control}/config", **malformed).status_code == 401
    token = read_token_file(token_file())
    assert httpx.post(f"{control}/policy", content=b"{not json",
                      headers={"Content-Type": "application/json", "X-Inferos-Token": token + "x"}).status_code == 401
    with running_server("--plugin", "inferos", env={"LEMONADE_API_KEY": "s3cret-key"}) as base:
        assert httpx.post(f"{base}/api/v1/chat/completions", **malformed).status_code == 401
        assert httpx.post(f"{base}/api/v1/chat/completions", content=b"{not json", headers={
            "Content-Type": "application/json", "Authorization": "Bearer s3cret-key"}).status_code == 400
        for key, status in (("s3cret-key", 400), ("s3cret-kez", 401), ("", 401)):   # Anthropic's X-Api-Key
            assert httpx.post(f"{base}/v1/messages", content=b"{not json", headers={
                "Content-Type": "application/json", "X-Api-Key": key}).status_code == status, key


def test_a_generated_token_never_reaches_the_log(isolated_home, tmp_path):
    log_path = tmp_path / "server.log"
    env = {"INFEROS_HOME": str(isolated_home), "INFEROS_AGENT_TOKEN": ""}
    with running_server("--plugin", "inferos", env=env, log_path=log_path) as base:
        assert httpx.get(f"{base}/api/v1/health").status_code == 200
    path = isolated_home / "agent-token"
    token = read_token_file(path)
    assert token and stat.S_IMODE(path.stat().st_mode) == 0o600
    log = log_path.read_text()
    assert token not in log and str(path) in log
