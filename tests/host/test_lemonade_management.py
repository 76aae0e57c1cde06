"""Lemonade's management API as its docs/api/lemonade.md describes it: per-model recipe options, streamed pull,
registration, /health's per-model and per-type fields, the /metrics families and /internal/set."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest


MODEL = "SmolLM2-135M-Instruct-CPU"


@pytest.fixture(scope="module")
def server(isolated_plugin_server):
    return isolated_plugin_server


def _sse(text: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
            kind = None
    return events


def test_recipe_options_are_saved_resolved_and_reset_without_loading(server):
    url = f"{server}/api/v1/models/{MODEL}/options"
    fresh = httpx.delete(url, timeout=30).json()
    assert fresh["saved"] == {} and fresh["defaults"]["ctx_size"] == -1 and fresh["recipe"] == "oga-cpu"
    assert fresh["resolved_ctx_size"] == fresh["effective"]["ctx_size"] or fresh["resolved_ctx_size"] > 0
    model_ctx = fresh["resolved_ctx_size"]

    preview = httpx.post(url, json={"ctx_size": 1024, "dry_run": True}, timeout=30).json()
    assert preview["effective"]["ctx_size"] == 1024 and preview["resolved_ctx_size"] == 1024
    assert preview["saved"] == {}, "a dry run saves nothing"

    saved = httpx.post(url, json={"ctx_size": 1024}, timeout=30).json()
    assert saved["saved"] == {"ctx_size": 1024} and httpx.get(url, timeout=30).json()["saved"] == {"ctx_size": 1024}
    entry = httpx.get(f"{server}/api/v1/models/{MODEL}", timeout=30).json()
    assert entry["recipe_options"]["ctx_size"] == 1024
    health = httpx.get(f"{server}/api/v1/health", timeout=30).json()
    running = next(m for m in health["all_models_loaded"] if m["model_name"] == MODEL)
    assert running["recipe_options"]["ctx_size"] != 1024, "saving never reloads a running model"

    for bad in ({"ctx_size": "big"}, {"ctx_size": 4}, {"llamacpp_backend": "vulkan"}, {"ctx_size": 1.5}):
        response = httpx.post(url, json=bad, timeout=30)
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "invalid_request"
    assert httpx.get(url, timeout=30).json()["saved"] == {"ctx_size": 1024}, "a rejected save changes nothing"

    automatic = httpx.post(url, json={"ctx_size": -1}, timeout=30).json()
    assert automatic["saved"] == {"ctx_size": -1} and automatic["resolved_ctx_size"] == model_ctx
    removed = httpx.post(url, json={"ctx_size": None}, timeout=30).json()
    assert removed["saved"] == {}
    assert httpx.get(f"{server}/api/v1/models/nope/options", timeout=30).status_code == 404


def test_load_uses_saved_options_and_save_options_persists_them(server):
    url = f"{server}/api/v1/models/{MODEL}/options"
    httpx.delete(url, timeout=30)

    def running_ctx() -> int:
        health = httpx.get(f"{server}/api/v1/health", timeout=30).json()
        return next(m for m in health["all_models_loaded"] if m["model_name"] == MODEL)["recipe_options"]["ctx_size"]

    loaded = httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL, "ctx_size": 768, "save_options": True},
                        timeout=120)
    assert loaded.status_code == 200 and running_ctx() == 768
    assert httpx.get(url, timeout=30).json()["saved"] == {"ctx_size": 768}
    httpx.post(f"{server}/api/v1/unload", json={"model_name": MODEL}, timeout=30)
    httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL}, timeout=120)
    assert running_ctx() == 768, "a load without options uses the saved ones"
    listed = {m["id"]: m for m in httpx.get(f"{server}/api/v1/models", timeout=30).json()["data"]}
    assert listed[MODEL]["context_length"] == 768
    chat = httpx.post(f"{server}/api/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi " * 900}], "max_tokens": 2})
    assert chat.status_code == 400, "the 768-token context is what the model now runs with"
    httpx.delete(url, timeout=30)
    httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL, "ctx_size": -1}, timeout=120)
    assert running_ctx() > 768


def test_a_streamed_pull_sends_progress_and_complete_events(server, calibrated_model):
    built = httpx.post(f"{server}/api/v1/pull", json={"model_name": MODEL, "stream": True}, timeout=120)
    assert built.status_code == 200 and built.headers["content-type"].startswith("text/event-stream")
    events = _sse(built.text)
    assert [kind for kind, _ in events[:-1]] == ["progress"] * (len(events) - 1) and events[-1][0] == "complete"
    assert events[-1][1]["percent"] == 100 and events[-1][1]["bytes_total"] > 1_000_000

    user = httpx.post(f"{server}/api/v1/pull", timeout=120, json={
        "model_name": "user.Local-SmolLM2", "checkpoints": {"main": str(calibrated_model)}, "stream": True})
    assert _sse(user.text)[-1][0] == "complete"
    assert "user.Local-SmolLM2" in [m["id"] for m in httpx.get(f"{server}/api/v1/models", timeout=30).json()["data"]]
    again = httpx.post(f"{server}/api/v1/pull", json={"model_name": "user.Local-SmolLM2"}, timeout=60)
    assert again.status_code == 200, "pulling a registered model again needs no checkpoint"

    broken = httpx.post(f"{server}/api/v1/pull", timeout=60, json={
        "model_name": "user.Broken", "checkpoint": "/nonexistent/folder", "stream": True})
    assert broken.status_code == 200 and _sse(broken.text)[-1][0] == "error"
    assert "user.Broken" not in [m["id"] for m in
                                 httpx.get(f"{server}/api/v1/models?show_all=true", timeout=30).json()["data"]]


def test_registering_without_a_checkpoint_is_a_400(server, calibrated_model):
    for path in ("/api/v1/pull", "/api/v1/models/register"):
        response = httpx.post(f"{server}{path}", json={"model_name": "user.No-Checkpoint", "recipe": "oga-cpu"},
                              timeout=30)
        assert response.status_code == 400, (path, response.text)
        assert "checkpoint" in response.json()["error"]["message"]
    registered = httpx.post(f"{server}/api/v1/models/register", timeout=60,
                            json={"model_name": "user.Registered", "checkpoint": str(calibrated_model)})
    assert registered.status_code == 200
    assert registered.json()["canonical_model_name"] == "user.Registered" and registered.json()["model"]["downloaded"]
    outside = httpx.post(f"{server}/api/v1/models/register", json={"model_name": "Plain", "checkpoint": "x"},
                         timeout=30)
    assert outside.status_code == 400


def test_health_reports_streaming_per_model_and_limits_per_type(server):
    httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL}, timeout=120)
    seen: list[bool] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 120,
            "stream": True, "ignore_eos": True}

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            health = httpx.get(f"{server}/api/v1/health", timeout=30).json()
            seen.extend(m["is_streaming"] for m in health["all_models_loaded"] if m["model_name"] == MODEL)
            time.sleep(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    with httpx.stream("POST", f"{server}/api/v1/chat/completions", json=body, timeout=120) as response:
        lines = iter(response.iter_lines())
        next(line for line in lines if line.startswith("data: "))  # the first chunk has arrived
        watcher.start()
        time.sleep(0.3)
        for _ in lines:
            pass
    stop.set()
    watcher.join()
    assert True in seen, "is_streaming while chunks flow"
    health = httpx.get(f"{server}/api/v1/health", timeout=30).json()
    entry = next(m for m in health["all_models_loaded"] if m["model_name"] == MODEL)
    assert entry["is_streaming"] is False and entry["is_busy"] is False
    assert entry["pid"] is None   # no backend process: the server's own pid would invite a client to kill the API
    assert set(health["max_models"]) == {"llm", "embedding", "reranking", "transcription", "image", "tts"}
    assert health["max_models"]["llm"] == 1 and health["max_models"]["embedding"] == 0
    assert health["telemetry"]["enabled"] is False and set(health["pinned_models"]) == set(health["max_models"])


def test_metrics_has_lemonades_model_and_cache_families(server):
    httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL}, timeout=120)
    ask = {"model": MODEL, "messages": [{"role": "system", "content": "You are terse. " * 20},
                                        {"role": "user", "content": "Hi"}], "max_tokens": 2}
    for _ in range(2):
        httpx.post(f"{server}/api/v1/chat/completions", json=ask, timeout=120)
    text = httpx.get(f"{server}/metrics", timeout=30).text
    assert re.search(r"(?m)^lemonade_loaded_models\{type=\"llm\"\} 1\.0$", text)
    assert re.search(r"(?m)^lemonade_max_loaded_models\{type=\"llm\"\} 1\.0$", text)
    assert re.search(rf'(?m)^lemonade_model_info\{{.*model_name="{MODEL}".*\}} 1\.0$', text)
    assert "# HELP lemonade_model_cache_tokens " in text and "# HELP lemonade_model_cache_tokens_total " in text
    cached = float(re.search(rf'(?m)^lemonade_model_cache_tokens_total\{{model_name="{MODEL}"\}} (\S+)$',
                             text).group(1))
    stats = httpx.get(f"{server}/api/v1/stats", timeout=30).json()
    assert cached >= stats["cache_tokens"] > 0
    assert float(re.search(r"(?m)^lemonade_cache_tokens_total (\S+)$", text).group(1)) == stats["cache_tokens_total"]
    assert httpx.head(f"{server}/metrics", timeout=30).status_code == 200


def test_internal_set_changes_the_server_ctx_size_and_refuses_what_it_cannot_change(server):
    url = f"{server}/api/v1/models/{MODEL}/options"
    httpx.delete(url, timeout=30)
    assert httpx.post(f"{server}/internal/set", json={"ctx_size": 640}, timeout=30).status_code == 200
    assert httpx.get(f"{server}/internal/config", timeout=30).json()["ctx_size"] == 640
    assert httpx.get(url, timeout=30).json()["resolved_ctx_size"] == 640
    assert httpx.get(f"{server}/api/v1/models/{MODEL}", timeout=30).json()["context_length"] != 640, \
        "the loaded model keeps the context it runs with"
    for bad in ({"llamacpp_backend": "rocm"}, {"ctx_size": "640"}, {"ctx_size": 3}, {"ctx_size": 2**64 - 1}, {},
                {"max_loaded_models": 0}, {"ctx_size": 640, "max_loaded_models": "2"}):
        assert httpx.post(f"{server}/internal/set", json=bad, timeout=30).status_code == 400, bad
    assert httpx.post(f"{server}/internal/set", json={"ctx_size": -1}, timeout=30).status_code == 200
    assert httpx.get(f"{server}/internal/config", timeout=30).json()["ctx_size"] == -1


def test_internal_set_changes_max_loaded_models_and_pin_keeps_a_model_from_being_unloaded(server):
    reply = httpx.post(f"{server}/internal/set", json={"max_loaded_models": 1}, timeout=30).json()
    assert reply["updated"] == {"max_loaded_models": 1}
    assert httpx.get(f"{server}/internal/config", timeout=30).json()["max_loaded_models"] == 1
    httpx.post(f"{server}/api/v1/load", json={"model_name": MODEL}, timeout=300).raise_for_status()
    pinned = httpx.post(f"{server}/internal/pin", json={"model_name": MODEL, "pinned": True}, timeout=30).json()
    assert pinned == {"model_name": MODEL, "pinned": True, "status": "success"}
    other = httpx.post(f"{server}/api/v1/load", json={"model_name": "SmolLM2-135M-Instruct-INT4-CPU"}, timeout=300)
    assert other.status_code == 409 and other.json()["error"]["code"] == "slots_pinned_error"
    for bad in ({"model_name": MODEL}, {"model_name": MODEL, "pinned": "yes"}, {"pinned": True},
                {"model_name": "SmolLM2-135M-Instruct-INT4-CPU", "pinned": True}):
        assert httpx.post(f"{server}/internal/pin", json=bad, timeout=30).status_code == 400, bad
    httpx.post(f"{server}/internal/pin", json={"model": MODEL, "pinned": False}, timeout=30).raise_for_status()
    assert httpx.post(f"{server}/api/v1/load", json={"model_name": "SmolLM2-135M-Instruct-INT4-CPU"},
                      timeout=300).status_code == 200


def test_cache_prompt_false_prefills_from_scratch(server):
    body = {"model": MODEL, "messages": [{"role": "system", "content": "You are terse. " * 30},
                                         {"role": "user", "content": "Hi"}], "max_tokens": 2}
    httpx.post(f"{server}/api/v1/chat/completions", json=body, timeout=120)
    again = httpx.post(f"{server}/api/v1/chat/completions", json=body, timeout=120).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    cold = httpx.post(f"{server}/api/v1/chat/completions", json={**body, "cache_prompt": False}, timeout=120).json()
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]


def test_an_alias_stands_for_its_target_in_every_model_field_until_it_is_deleted(server):
    made = httpx.post(f"{server}/internal/aliases", json={"alias": "my-chat", "target": MODEL}, timeout=30)
    assert made.json() == {"alias": "my-chat", "status": "ok", "target": MODEL}
    listed = httpx.get(f"{server}/internal/aliases", timeout=30).json()["aliases"]
    assert {"alias": "my-chat", "target": MODEL, "downloaded": True, "recipe": "oga-cpu"} in listed
    # a chain: an alias of the alias, used by the OpenAI route and by Ollama's with its :latest tag
    httpx.post(f"{server}/internal/aliases", json={"alias": "chat2", "model": "my-chat"}, timeout=30)
    body = {"model": "chat2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = httpx.post(f"{server}/api/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    ollama = httpx.post(f"{server}/api/chat", json={**body, "model": "chat2:latest", "stream": False}, timeout=120)
    assert ollama.status_code == 200, ollama.text
    assert httpx.delete(f"{server}/internal/aliases/chat2", timeout=30).json() == {"alias": "chat2",
                                                                                 "status": "deleted"}
    gone = httpx.delete(f"{server}/internal/aliases/chat2", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "alias_not_found"
    assert httpx.post(f"{server}/api/v1/chat/completions", json=body, timeout=120).status_code == 404
    httpx.delete(f"{server}/internal/aliases/my-chat", timeout=30).raise_for_status()


def test_an_alias_that_would_hide_a_model_loop_or_take_a_reserved_prefix_is_refused(server):
    for bad in ({"alias": "x"}, {"target": MODEL}, {"alias": "x", "target": "x"},
                {"alias": "user.mine", "target": MODEL}, {"alias": "builtin.x", "target": MODEL}, []):
        assert httpx.post(f"{server}/internal/aliases", json=bad, timeout=30).status_code == 400, bad
    hides = httpx.post(f"{server}/internal/aliases", json={"alias": MODEL, "target": "other"}, timeout=30)
    assert hides.status_code == 409 and hides.json()["error"]["code"] == "alias_conflict"
    httpx.post(f"{server}/internal/aliases", json={"alias": "a", "target": "b"}, timeout=30).raise_for_status()
    loop = httpx.post(f"{server}/internal/aliases", json={"alias": "b", "target": "a"}, timeout=30)
    assert loop.status_code == 409 and "loop" in loop.json()["error"]["message"]
    assert [a["alias"] for a in httpx.get(f"{server}/internal/aliases", timeout=30).json()["aliases"]] == ["a"]
    httpx.delete(f"{server}/internal/aliases/a", timeout=30).raise_for_status()
