"""The rough edges a new user meets first: --version, --help, the log, status, the OpenAPI documents."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click
import httpx

from lemonade_inferos.bench.servers import free_port
from lemonade_inferos.cli.lemonade_server import cli, serve

from ..conftest import control_url
from .conftest import running_server

MODEL = "SmolLM2-135M-Instruct-CPU"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_version_is_printed():
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("lemonade-server version 11.7.0 (lemonade-inferos ")


def test_every_serve_option_is_described_and_the_environment_twins_are_listed():
    undocumented = [p.name for p in serve.params if isinstance(p, click.Option) and not p.help]
    assert undocumented == []
    text = _cli("serve", "--help").stdout
    for name in ("LEMONADE_HOST", "LEMONADE_PORT", "LEMONADE_CTX_SIZE", "LEMONADE_REQUEST_TIMEOUT"):
        assert name in text
    group = " ".join(_cli("--help").stdout.split())
    assert "LEMONADE_API_KEY" in group and "LEMONADE_ALLOWED_HOSTS" in group and cli.help


def test_serving_is_logged_once_the_port_accepts_and_requests_are_logged(model_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--plugin",
                                 "inferos", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while f"serving on http://127.0.0.1:{port}" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.02)
        assert httpx.get(f"http://127.0.0.1:{port}/live", timeout=5).status_code == 200  # no refused connection
        httpx.post(f"http://127.0.0.1:{port}/api/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    text = log_path.read_text()
    assert '"POST /api/v1/chat/completions HTTP/1.1" 200' in text
    assert not [line for line in text.splitlines() if " WARNING " in line and "ExecutionProvider" in line]


def test_status_says_when_the_api_key_is_missing(model_dir):
    port = free_port()
    with running_server("--plugin", "inferos", port=port, env={"LEMONADE_API_KEY": "s3cret-key"}):
        missing = _cli("status", "--port", str(port), env={"LEMONADE_API_KEY": ""})
        assert missing.returncode == 0 and "needs an API key" in missing.stdout and "None" not in missing.stdout
        ok = _cli("status", "--port", str(port), env={"LEMONADE_API_KEY": "s3cret-key"})
        assert f"model loaded: {MODEL}" in ok.stdout


def test_the_openapi_documents_say_400_where_the_servers_answer_400(plugin_server):
    for url in (f"{plugin_server}/openapi.json", control_url(plugin_server).removesuffix("/v1") + "/openapi.json"):
        document = httpx.get(url).json()
        codes = {code for path in document["paths"].values() for op in path.values() for code in op["responses"]}
        assert "422" not in codes and "400" in codes
