"""``/api/v1/load`` returns once the model can answer: the engine its requests run on is built by then, and
``/api/v1/health`` lists the model as loading while it is being built (Lemonade's load waits for its backend).

A real host on a free loopback port in this process, with a plugin that holds the build at ``load_session`` until
the test lets it go; and a real ``serve --plugin inferos`` server whose health, before any request, already shows
the INT8 live form of a built engine.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.hooktypes import RunPlan
from lemonade_inferos.plugins import new_plugin_manager

from .conftest import host_in_process

MODEL = "SmolLM2-135M-Instruct-CPU"


class HeldLoadPlugin:
    """Asks for our engine; its ``load_session`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[str] = []

    @hookimpl
    def load_session(self, model_name):
        self.asked.append(model_name)
        assert self.release.wait(60), "the test never released the load"
        return SessionPolicy()

    @hookimpl
    def pre_run(self, context):
        return RunPlan(session=SessionPolicy())


@pytest.fixture
def held_host(model_dir):
    plugin = HeldLoadPlugin()
    pm = new_plugin_manager()
    pm.register(plugin, name="held")
    with host_in_process(pm, preload=False) as (base, app):
        yield base, plugin, app.state.host.models
        plugin.release.set()


def _entries(base: str) -> dict[str, dict]:
    health = httpx.get(f"{base}/api/v1/health", timeout=10).json()
    return {e["model_name"]: e for e in health["all_models_loaded"]}


def test_load_returns_with_the_engine_built_and_health_says_loading_meanwhile(held_host):
    base, plugin, models = held_host
    answer: dict = {}
    loader = threading.Thread(target=lambda: answer.update(
        response=httpx.post(f"{base}/api/v1/load", json={"model_name": MODEL}, timeout=120)))
    loader.start()
    deadline = time.time() + 30
    while MODEL not in _entries(base):
        assert time.time() < deadline, "health never listed the loading model"
        time.sleep(0.05)
    assert _entries(base)[MODEL]["status"] == "loading"
    assert loader.is_alive() and "response" not in answer, "load answered before the engine was built"

    plugin.release.set()
    loader.join(120)
    assert answer["response"].status_code == 200
    entry = _entries(base)[MODEL]
    assert entry["status"] == "ready" and entry["inferos"]["live_kv"] is not None
    loaded = models.loaded[MODEL]
    engine = loaded.engine("inferos", SessionPolicy())  # what a request takes: the engine the load built
    reply = httpx.post(f"{base}/api/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200
    assert loaded.engine("inferos", SessionPolicy()) is engine, "the first request built another engine"
    assert plugin.asked == [MODEL]


def test_a_served_model_has_its_engine_before_the_first_request(isolated_plugin_server):
    entry = _entries(isolated_plugin_server)[MODEL]
    assert entry["status"] == "ready"
    assert entry["inferos"]["live_kv"]["live_kv"] == "int8"
