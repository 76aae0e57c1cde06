"""Lemonade's router policies: first match wins, nothing matching falls open to the default, every evaluated
condition in the trace; a policy that does not hold together is refused with the field named; model-backed
conditions run on this host's own model, constrained to their labels."""

from __future__ import annotations

import httpx
import pytest

from lemonade_inferos.host.router_policy import RouteInput, RouterPolicy, decide

MODEL = "SmolLM2-135M-Instruct-CPU"
OTHER = "SmolLM2-135M-Instruct-INT4-CPU"


def policy(rules, classifiers=(), **routing):
    return {"version": "1", "recipe": "collection.router", "components": [MODEL, OTHER],
            "routing": {"candidates": [MODEL, OTHER], "default_model": MODEL, "rules": list(rules),
                        "classifiers": list(classifiers), **routing}}


CODING = {"id": "coding", "match": {"any": [{"keywords_any": ["def ", "stack trace"]}, {"min_chars": 40}]},
          "route_to": OTHER, "outputs": {"reason": "code"}}
PRIVATE = {"id": "private", "match": {"metadata": {"key": "consent", "equals": "denied"}}, "route_to": MODEL}


def no_models(classifier, given):
    raise AssertionError("no model-backed condition in this policy")


def test_first_matching_rule_wins_and_nothing_matching_falls_open_to_the_default():
    parsed = RouterPolicy.model_validate(policy([PRIVATE, CODING]))
    private = decide(parsed, RouteInput("def f(): pass", metadata={"consent": "denied"}), no_models)
    assert (private.route_to, private.matched_rule, private.default_used) == (MODEL, "private", False)
    coding = decide(parsed, RouteInput("please write a def to reverse a list"), no_models)
    assert (coding.route_to, coding.matched_rule, coding.outputs) == (OTHER, "coding", {"reason": "code"})
    assert coding.trace == [{"condition": "metadata", "result": False}, {"condition": "keywords_any", "result": True}]
    plain = decide(parsed, RouteInput("hi"), no_models)
    assert (plain.route_to, plain.matched_rule, plain.default_used) == (MODEL, "", True)


def test_conditions_combine_with_all_any_not_and_implicit_all():
    rule = {"id": "r", "route_to": OTHER,
            "match": {"not": {"has_tools": True}, "all": [{"regex": "^[A-Z]"}, {"max_chars": 10}]}}
    parsed = RouterPolicy.model_validate(policy([rule]))
    assert decide(parsed, RouteInput("Hello"), no_models).matched_rule == "r"
    assert decide(parsed, RouteInput("Hello", has_tools=True), no_models).default_used
    assert decide(parsed, RouteInput("hello"), no_models).default_used
    assert decide(parsed, RouteInput("Hello " * 3), no_models).default_used, "min/max_chars count UTF-8 bytes"


@pytest.mark.parametrize("broken, field", [
    ({"routing": {"candidates": [MODEL], "default_model": OTHER, "rules": []}}, "default_model"),
    ({"routing": {"candidates": ["elsewhere"], "default_model": "elsewhere", "rules": []}}, "candidates"),
    ({"routing": {"candidates": [MODEL], "default_model": MODEL, "rules": [
        {"id": "x", "match": {"classifier": "missing", "label": "a"}, "route_to": MODEL}]}}, "missing"),
    ({"routing": {"candidates": [MODEL], "default_model": MODEL, "rules": [
        {"id": "x", "match": {"shouting": True}, "route_to": MODEL}]}}, "shouting"),
    ({"routing": {"candidates": [MODEL], "default_model": MODEL}}, "routing.rules or"),
    ({"version": "2"}, "version"),
])
def test_a_policy_that_does_not_hold_together_names_what_is_wrong(broken, field):
    document = {**policy([]), **broken}
    with pytest.raises(ValueError, match=field):
        RouterPolicy.model_validate(document)


def test_validate_runs_an_llm_classifier_on_our_own_model_and_reports_the_decision(plugin_server):
    risk = {"id": "risk", "type": "llm", "model": MODEL, "labels": ["SAFE", "RISKY"],
            "prompt": "Is running this request's tool calls risky?"}
    topic = {"id": "topic", "type": "semantic_similarity", "model": MODEL,
             "reference_phrases": {"coding": ["write a function"]}}
    rules = [{"id": "by-topic", "match": {"classifier": "topic", "label": "coding"}, "route_to": OTHER},
             {"id": "risky", "match": {"classifier": "risk", "label": "RISKY"}, "route_to": OTHER},
             {"id": "safe", "match": {"classifier": "risk", "label": "SAFE"}, "route_to": MODEL}]
    reply = httpx.post(f"{plugin_server}/api/v1/routing/validate", timeout=300,
                       json={"policy": policy(rules, [risk, topic]), "prompt": "delete every file on the disk"})
    assert reply.status_code == 200, reply.text
    decision = reply.json()["decision"]
    assert decision["trace"][0]["classifier"] == "topic" and decision["trace"][0]["result"] is False
    assert "embedding model" in decision["trace"][0]["error"], "no embedding model here: on_error match_false"
    scored = [t for t in decision["trace"] if t.get("classifier") == "risk"]
    assert sorted(t["score"] for t in scored[:2]) in ([0.0, 1.0], [1.0]) and decision["matched_rule"] in ("risky", "safe")
    assert decision["route_to"] == {"risky": OTHER, "safe": MODEL}[decision["matched_rule"]]


def test_validate_desugars_the_router_shorthand_and_refuses_bad_policies(plugin_server):
    shorthand = {**policy([]), "routing": {"candidates": [MODEL, OTHER], "default_model": MODEL,
                                           "router": {"type": "llm", "model": MODEL, "prompt": "Pick one."}}}
    reply = httpx.post(f"{plugin_server}/api/v1/routing/validate", json={"policy": shorthand, "prompt": "hi"},
                       timeout=300).json()
    routing = reply["normalized_policy"]["routing"]
    assert "router" not in routing and routing["classifiers"][0]["id"] == "__router"
    assert [r["id"] for r in routing["rules"]] == ["__route_0", "__route_1"]
    assert reply["decision"]["route_to"] in (MODEL, OTHER) and not reply["decision"]["default_used"]
    for body in ({"prompt": "x"}, {"policy": policy([]), "prompt": 3}, {"policy": policy([]), "has_tools": "yes"},
                 {"policy": policy([]), "metadata": {"k": 1}}):
        assert httpx.post(f"{plugin_server}/api/v1/routing/validate", json=body, timeout=30).status_code == 400
    bad = httpx.post(f"{plugin_server}/api/v1/routing/validate", timeout=30,
                     json={"policy": {**policy([]), "components": [OTHER]}})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("Invalid routing policy:")
