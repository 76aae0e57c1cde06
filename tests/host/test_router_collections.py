"""Router collections (Lemonade 11's ``collection.router``): a policy registered with ``/pull`` is a model name any
client can use; each request runs on the candidate the policy picks, the reply says which rule picked it, and the
decisions count in ``/stats`` and ``/metrics``. A policy this host cannot honour is refused when it is registered."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct-CPU"
COPY = "user.Router-Test-Copy"     # the same weights under another name: which one answered is in the reply
ROUTER = "user.Router-Test"
CODING = {"id": "coding-to-copy", "match": {"any": [{"keywords_any": ["def ", "function"]}, {"min_chars": 4000}]},
          "route_to": COPY, "outputs": {"reason": "complex"}}
PRIVATE = {"id": "private-stays", "match": {"metadata": {"key": "consent", "equals": "denied"}}, "route_to": MODEL,
           "outputs": {"reason": "privacy"}}


def policy(name=ROUTER, rules=(PRIVATE, CODING), classifiers=(), components=(MODEL, COPY)):
    return {"version": "1", "model_name": name, "recipe": "collection.router", "components": list(components),
            "routing": {"candidates": [MODEL, COPY], "default_model": MODEL, "rules": list(rules),
                        "classifiers": list(classifiers)}}


@pytest.fixture(scope="module")
def server(isolated_plugin_server, calibrated_model):
    base = isolated_plugin_server
    copy = httpx.post(f"{base}/api/v1/pull", json={"model_name": COPY, "checkpoint": str(calibrated_model)},
                      timeout=600)
    assert copy.status_code == 200, copy.text
    registered = httpx.post(f"{base}/api/v1/pull", json=policy(), timeout=60)
    assert registered.status_code == 200, registered.text
    return base


def chat(base, prompt, **extra):
    return httpx.post(f"{base}/api/v1/chat/completions", timeout=300, json={
        "model": ROUTER, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0.0,
        **extra})


def test_each_request_runs_on_the_candidate_the_first_matching_rule_picks(server):
    coding = chat(server, "Write a Python function to reverse a list.", route_trace=True)
    assert coding.status_code == 200, coding.text
    assert coding.headers["x-lemonade-route"] == "coding-to-copy"
    assert coding.json()["model"] == COPY, "the reply names the candidate that answered"
    decision = coding.json()["x_lemonade_route"]
    assert (decision["route_to"], decision["matched_rule"], decision["default_used"]) == (COPY, "coding-to-copy", False)
    assert decision["outputs"] == {"reason": "complex"} and {"condition": "keywords_any", "result": True} \
        in decision["trace"]
    private = chat(server, "Write a function.", metadata={"consent": "denied"}, route_trace=True)
    assert private.headers["x-lemonade-route"] == "private-stays" and private.json()["model"] == MODEL
    plain = chat(server, "Tell me a fun fact about otters.")
    assert plain.headers["x-lemonade-route"] == "default" and plain.json()["model"] == MODEL
    assert "x_lemonade_route" not in plain.json(), "the decision rides in the body only when route_trace asks"


def test_a_streamed_reply_carries_the_decision_on_its_first_event(server):
    with httpx.stream("POST", f"{server}/api/v1/chat/completions", timeout=300, json={
            "model": ROUTER, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 4,
            "stream": True, "route_trace": True}) as reply:
        assert reply.headers["x-lemonade-route"] == "coding-to-copy"
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    assert events[0]["x_lemonade_route"]["route_to"] == COPY
    assert all("x_lemonade_route" not in e for e in events[1:])


def test_the_openai_and_anthropic_clients_use_a_router_by_name(server):
    client = openai.OpenAI(base_url=f"{server}/api/v1", api_key="lemonade")
    raw = client.chat.completions.with_raw_response.create(
        model=ROUTER, messages=[{"role": "user", "content": "a function that sorts"}], max_tokens=4,
        extra_body={"route_trace": True})
    assert raw.headers["x-lemonade-route"] == "coding-to-copy" and raw.parse().model == COPY
    claude = anthropic.Anthropic(base_url=server, api_key="lemonade")
    message = claude.messages.with_raw_response.create(
        model=ROUTER, max_tokens=4, messages=[{"role": "user", "content": "hello there"}])
    assert message.headers["x-lemonade-route"] == "default" and message.parse().model == MODEL


def test_decisions_and_a_conversations_switches_are_counted(server):
    def counters():
        stats = httpx.get(f"{server}/api/v1/stats", timeout=30).json()
        return stats["routing_decisions_total"], stats["routing_switches_total"]

    before = counters()
    first = [{"role": "user", "content": "Give me a fun fact about owls."}]
    followup = first + [{"role": "assistant", "content": "Owls turn their heads far."},
                        {"role": "user", "content": "Now write a function about owls."}]
    for messages in (first, followup, followup):
        reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=300,
                           json={"model": ROUTER, "messages": messages, "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    counted = httpx.post(f"{server}/v1/messages/count_tokens", timeout=60,
                         json={"model": ROUTER, "messages": [{"role": "user", "content": "write a function"}]})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    after = counters()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1), \
        "default -> copy is one switch, copy -> copy none; counting tokens is no decision"
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    assert f"lemonade_routing_decisions_total {float(after[0])}" in metrics
    assert f"lemonade_routing_switches_total {float(after[1])}" in metrics


def test_the_router_is_listed_and_is_not_loaded_itself(server):
    listed = {m["id"]: m for m in httpx.get(f"{server}/api/v1/models", timeout=30).json()["data"]}
    assert listed[ROUTER]["recipe"] == "collection.router" and listed[ROUTER]["downloaded"] is True
    load = httpx.post(f"{server}/api/v1/load", json={"model_name": ROUTER}, timeout=30)
    assert load.status_code == 400 and "router collection" in load.json()["error"]["message"]


@pytest.mark.parametrize("document, says", [
    (policy(name="user.R1", components=(MODEL, COPY, "No-Such-Model")), "No-Such-Model"),
    (policy(name="user.R2", components=(MODEL, COPY, ROUTER)), "router collection"),
    (policy(name="Not-User"), "user.NAME"),
    (policy(name="user.R3", classifiers=[{"id": "topic", "type": "semantic_similarity", "model": MODEL,
                                          "reference_phrases": {"coding": ["write code"]}}]), "embedding model"),
    (policy(name="user.R4", rules=[{**CODING, "route_to": "elsewhere"}]), "route_to"),
])
def test_a_policy_this_host_cannot_honour_is_refused_and_nothing_is_registered(server, document, says):
    reply = httpx.post(f"{server}/api/v1/pull", json=document, timeout=30)
    assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text
    assert reply.json()["error"]["message"].startswith("Invalid routing policy:")
    names = {m["id"] for m in httpx.get(f"{server}/api/v1/models?show_all=true", timeout=30).json()["data"]}
    assert document["model_name"] not in names


def test_a_router_is_deleted_like_a_model(server):
    assert httpx.post(f"{server}/api/v1/pull", json=policy(name="user.Short-Lived"), timeout=30).status_code == 200
    assert httpx.post(f"{server}/api/v1/delete", json={"model_name": "user.Short-Lived"}, timeout=30).status_code \
        == 200
    gone = chat(server, "hi", model="user.Short-Lived")
    assert gone.status_code == 404


def test_images_sent_to_a_text_only_host_are_refused_not_dropped(server):
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    reply = httpx.post(f"{server}/api/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "image_input_unsupported"
    ollama = httpx.post(f"{server}/api/chat", timeout=60, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "see", "images": ["iVBORw0KGgo="]}]})
    assert ollama.status_code == 400
