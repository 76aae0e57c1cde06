"""Lemonade's router policies (``collection.router``): the document, its structural checks, and the first-match
engine that turns a request into a decision with its trace.

Rules are tried top to bottom and the first whose ``match`` holds picks ``route_to``; nothing matching falls open to
``default_model``. Deterministic conditions are evaluated here; a model-backed one (``classifier`` on an entry of
``routing.classifiers``) asks a ``Scorer`` for ``{label: score}`` and, when it cannot answer, follows the entry's
``on_error`` (``match_false`` by default), the error in the trace. A ``routing.router`` block is shorthand for one
``llm`` classifier over the candidates and one rule per candidate (``normalized()`` shows the desugared form).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LOGICAL = ("any", "all", "not")
DETERMINISTIC = ("keywords_any", "keywords_all", "regex", "min_chars", "max_chars", "has_tools", "has_images",
                 "metadata")
CLASSIFIER_KEYS = ("classifier", "label", "min_score", "max_score")


class PolicyError(ValueError):
    """A policy that is invalid or inconsistent (Lemonade: 400, ``Invalid routing policy: ...``)."""


class Classifier(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["semantic_similarity", "classifier", "llm"]
    model: str
    labels: list[str] = Field(default_factory=list)
    prompt: str | None = None
    default_label: str | None = None
    reference_phrases: dict[str, list[str]] | None = None
    on_error: Literal["match_false", "match_true"] = "match_false"


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    match: dict[str, Any]
    route_to: str
    outputs: dict[str, Any] = Field(default_factory=dict)


class RouterBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["llm"]
    model: str
    prompt: str


class Routing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[str] = Field(min_length=1)
    default_model: str
    rules: list[Rule] | None = None
    classifiers: list[Classifier] = Field(default_factory=list)
    router: RouterBlock | None = None

    @model_validator(mode="after")
    def _rules_or_router(self) -> "Routing":
        if (self.rules is None) == (self.router is None):
            raise ValueError("a policy has either routing.rules or a routing.router block")
        if self.router is not None and self.classifiers:
            raise ValueError("routing.router replaces routing.rules and routing.classifiers")
        return self


class RouterPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal["1"]
    recipe: Literal["collection.router"]
    components: list[str] = Field(min_length=1)
    routing: Routing
    model_name: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "RouterPolicy":
        routing, components = self.routing, set(self.components)
        _members(routing.candidates, components, "routing.candidates", "components")
        _members([routing.default_model], set(routing.candidates), "routing.default_model", "routing.candidates")
        ids = {c.id for c in routing.classifiers}
        _members([c.model for c in routing.classifiers], components, "routing.classifiers[].model", "components")
        if routing.router is not None:
            _members([routing.router.model], components, "routing.router.model", "components")
        for rule in routing.rules or ():
            _members([rule.route_to], set(routing.candidates), f"rule {rule.id!r} route_to", "routing.candidates")
            check_expression(rule.match, ids, f"rule {rule.id!r}")
        return self

    def normalized(self) -> "RouterPolicy":
        """The policy as it is evaluated: a ``routing.router`` block desugared into its classifier and rules."""
        router = self.routing.router
        if router is None:
            return self
        candidates = self.routing.candidates
        classifier = Classifier(id="__router", type="llm", model=router.model, prompt=router.prompt,
                                labels=list(candidates))
        rules = [Rule(id=f"__route_{i}", match={"classifier": "__router", "label": c, "min_score": 1.0}, route_to=c)
                 for i, c in enumerate(candidates)]
        routing = Routing(candidates=candidates, default_model=self.routing.default_model, rules=rules,
                          classifiers=[classifier])
        return self.model_copy(update={"routing": routing})


def _members(values: list[str], allowed: set[str], what: str, within: str) -> None:
    missing = [v for v in values if v not in allowed]
    if missing:
        raise ValueError(f"{what} must be members of {within}; not: {missing}")


def check_expression(expr: Any, classifier_ids: set[str], where: str) -> None:
    """A match expression's shape: logical operators, known conditions, classifier ids defined."""
    if not isinstance(expr, dict) or not expr:
        raise ValueError(f"{where}: a match is a non-empty object")
    for key, value in expr.items():
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise ValueError(f"{where}: {key} takes a non-empty list of matches")
            for item in value:
                check_expression(item, classifier_ids, where)
        elif key == "not":
            check_expression(value, classifier_ids, where)
        elif key == "classifier":
            if value not in classifier_ids:
                raise ValueError(f"{where}: classifier {value!r} is not defined in routing.classifiers")
            if not isinstance(expr.get("label"), str):
                raise ValueError(f"{where}: a classifier condition needs a label")
        elif key not in DETERMINISTIC and key not in CLASSIFIER_KEYS:
            raise ValueError(f"{where}: unknown condition {key!r}")
    if "regex" in expr:
        try:
            re.compile(str(expr["regex"]))
        except re.error as exc:
            raise ValueError(f"{where}: regex {expr['regex']!r}: {exc}") from exc


@dataclass
class RouteInput:
    """What a request offers the conditions: its text, whether it carries tools or images, its metadata."""

    text: str
    has_tools: bool = False
    has_images: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    route_to: str
    matched_rule: str
    default_used: bool
    outputs: dict[str, Any]
    trace: list[dict[str, Any]]
    version: str = "1"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "route_to": self.route_to, "matched_rule": self.matched_rule,
                "default_used": self.default_used, "outputs": self.outputs, "trace": self.trace}


Scorer = Callable[[Classifier, RouteInput], dict[str, float]]   # raises when it cannot score


def decide(policy: RouterPolicy, request: RouteInput, scorer: Scorer) -> Decision:
    """The first rule whose match holds, else ``default_model``; every evaluated condition in the trace."""
    policy = policy.normalized()
    classifiers = {c.id: c for c in policy.routing.classifiers}
    trace: list[dict[str, Any]] = []
    scores: dict[str, dict[str, float] | Exception] = {}
    for rule in policy.routing.rules or ():
        if _holds(rule.match, request, classifiers, scorer, scores, trace):
            return Decision(rule.route_to, rule.id, False, dict(rule.outputs), trace)
    return Decision(policy.routing.default_model, "", True, {}, trace)


def _holds(expr: dict[str, Any], request: RouteInput, classifiers: dict[str, Classifier], scorer: Scorer,
           scores: dict[str, Any], trace: list[dict[str, Any]]) -> bool:
    """Several keys in one object are an implicit ``all``: the first that does not hold decides."""
    for key, value in expr.items():
        if key == "any":
            result = any(_holds(item, request, classifiers, scorer, scores, trace) for item in value)
        elif key == "all":
            result = all(_holds(item, request, classifiers, scorer, scores, trace) for item in value)
        elif key == "not":
            result = not _holds(value, request, classifiers, scorer, scores, trace)
        elif key == "classifier":
            result = _classified(expr, request, classifiers[value], scorer, scores, trace)
        elif key in DETERMINISTIC:
            result = _deterministic(key, value, request)
            trace.append({"condition": key, "result": result})
        else:
            continue   # label, min_score, max_score: part of the classifier condition
        if not result:
            return False
    return True


def _deterministic(key: str, value: Any, request: RouteInput) -> bool:
    text = request.text
    if key == "keywords_any":
        return any(str(k).lower() in text.lower() for k in value)
    if key == "keywords_all":
        return all(str(k).lower() in text.lower() for k in value)
    if key == "regex":
        return re.search(str(value), text) is not None
    if key == "min_chars":
        return len(text.encode("utf-8")) >= int(value)
    if key == "max_chars":
        return len(text.encode("utf-8")) <= int(value)
    if key == "has_tools":
        return request.has_tools == bool(value)
    if key == "has_images":
        return request.has_images == bool(value)
    return _metadata(value, request.metadata)


def _metadata(condition: dict[str, Any], metadata: dict[str, str]) -> bool:
    key = condition.get("key")
    if "exists" in condition:
        return (key in metadata) == bool(condition["exists"])
    if key not in metadata:
        return False
    if "equals" in condition:
        return metadata[key] == condition["equals"]
    return metadata[key] in (condition.get("any") or [])


def _classified(expr: dict[str, Any], request: RouteInput, classifier: Classifier, scorer: Scorer,
                scores: dict[str, Any], trace: list[dict[str, Any]]) -> bool:
    """A band test on one label's score; the classifier runs once per request however many rules ask it."""
    if classifier.id not in scores:
        try:
            scores[classifier.id] = scorer(classifier, request)
        except Exception as exc:   # a model that cannot answer: the entry's on_error decides, the trace says why
            scores[classifier.id] = exc
    found = scores[classifier.id]
    entry: dict[str, Any] = {"condition": "classifier", "classifier": classifier.id, "label": expr["label"]}
    if isinstance(found, Exception):
        result = classifier.on_error == "match_true"
        trace.append({**entry, "result": result, "error": str(found)})
        return result
    low = expr.get("min_score", 0.5 if "max_score" not in expr else 0.0)
    high = expr.get("max_score", 1.0)
    score = float(found.get(expr["label"], 0.0))
    result = low <= score <= high
    trace.append({**entry, "score": score, "result": result})
    return result
