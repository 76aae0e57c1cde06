"""A failure in our engine before the first token: the request is served by the baseline engine.

A real host on a free loopback port, in this process, with a plugin whose cache cannot be built (the way a
broken model patch or a failed restore would fail), and the openai client.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn

from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.host.app import create_app
from lemonade_inferos.hooktypes import RunPlan
from lemonade_inferos.host.settings import HostSettings
from lemonade_inferos.plugins import new_plugin_manager

from .conftest import free_port


class BrokenCachePlugin:
    """Asks for our engine with a cache factory that fails, and keeps what PostRun reports."""

    def __init__(self) -> None:
        self.reports = []

    @hookimpl
    def pre_run(self, context):
        return RunPlan()

    @hookimpl
    def make_cache(self, context, plan, engine):
        raise RuntimeError("restore failed: simulated")

    @hookimpl
    def post_run(self, context, plan, stats, cache):
        self.reports.append(stats)


@pytest.fixture
def broken_host(model_dir):
    plugin = BrokenCachePlugin()
    pm = new_plugin_manager()
    pm.register(plugin, name="broken")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(HostSettings(port=port), pm), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the in-process host did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", plugin
    server.should_exit = True
    thread.join(10)


def test_an_engine_failure_before_the_first_token_is_served_by_the_baseline(broken_host):
    base, plugin = broken_host
    client = openai.OpenAI(base_url=f"{base}/api/v1", api_key="unused")
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct-CPU", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    failed, served = plugin.reports
    assert failed.engine == "inferos" and "restore failed" in failed.error
    assert served.engine == "og" and served.baseline and served.error is None
    assert "restore failed" in served.kv["fallback_from_error"]
