"""Fuzzing both OpenAPI documents (schemathesis, bounded): no 5xx, errors in the error shape, and a server that
still answers a plain chat afterwards (no fuzzed request may break a later one).

One server for the module, with its own INFEROS_HOME (its model is a symlinked copy, so a fuzzed delete cannot
remove the shared build), a small context so every fuzzed generation is short, and a known control token.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from lemonade_inferos.bench.servers import running_server

from ..conftest import control_url

MODEL = "SmolLM2-135M-Instruct-CPU"
TOKEN = "fuzz-token-0123456789abcdef"
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    shutil.copytree(model_dir, home / "models" / model_dir.name, copy_function=os.symlink)
    log_path = home.parent / "server.log"
    with running_server("--plugin", "inferos", "--ctx-size", "128", "--request-timeout", "60",
                        "--inferos-prefix-spill-mb", "16", "--inferos-shadow-every", "0",
                        env={"INFEROS_HOME": str(home), "INFEROS_AGENT_TOKEN": TOKEN}, log_path=log_path) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def host_api(fuzz_server):
    base, _ = fuzz_server
    # the router is mounted under four prefixes; one of them covers its code; then Ollama's routes and /internal
    return schemathesis.openapi.from_url(f"{base}/openapi.json").include(
        path_regex=r"^/(api/v1/|api/(version|tags|ps|chat|generate)$|internal/|live|metrics)")


@pytest.fixture(scope="module")
def control_api(fuzz_server):
    base, _ = fuzz_server
    return schemathesis.openapi.from_url(control_url(base).removesuffix("/v1") + "/openapi.json")


def _check(response) -> None:
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]


def _fuzz(schema, **call) -> None:
    """Every operation of ``schema``, FUZZ's number of generated cases each (schemathesis' strategies driven by
    hypothesis directly: its pytest plugin does not run under this pytest)."""
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        @FUZZ
        @given(case=operation.as_strategy())
        def run(case) -> None:
            _check(case.call(**call))

        run()


def test_the_host_answers_fuzzed_requests_without_a_server_error(host_api):
    _fuzz(host_api, timeout=120)


def test_the_control_api_answers_fuzzed_requests_without_a_server_error(control_api):
    _fuzz(control_api, headers={"X-Inferos-Token": TOKEN}, timeout=60)


def test_the_server_still_serves_after_the_fuzzing(fuzz_server):
    base, log_path = fuzz_server
    control = control_url(base)
    httpx.post(f"{control}/baseline", json={"enable": False}, headers={"X-Inferos-Token": TOKEN})
    reply = httpx.post(f"{base}/api/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "max_tokens": 8, "temperature": 0,  # the rest: what /params stored
                             "messages": [{"role": "user", "content": "Hi!"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip()
    assert httpx.get(f"{control}/health").json()["status"] == "healthy"
    assert "Traceback" not in log_path.read_text()
