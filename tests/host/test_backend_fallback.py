"""A failure in our engine before the first token: the request is served by the baseline engine.

A real host on a free loopback port, in this process, with a plugin whose cache cannot be built (the way a
broken model patch or a failed restore would fail), and the openai client.
"""

from __future__ import annotations

import openai
import pytest

from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.hooktypes import RunPlan
from lemonade_inferos.plugins import new_plugin_manager

from .conftest import host_in_process


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
    with host_in_process(pm) as (base, _app):
        yield base, plugin


def test_an_engine_failure_before_the_first_token_is_served_by_the_baseline(broken_host):
    base, plugin = broken_host
    client = openai.OpenAI(base_url=f"{base}/api/v1", api_key="unused")
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct-CPU", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    failed, served = plugin.reports
    assert failed.engine == "inferos" and "restore failed" in failed.error
    assert served.engine == "og" and served.baseline and served.error is None
    assert "restore failed" in served.fallback_from_error
