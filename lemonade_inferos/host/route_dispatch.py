"""Router collections (Lemonade 11's ``collection.router``): registered with ``/pull`` of the policy document, then
named in any API's ``model`` field, where each request runs on the candidate the policy picks for it.

What a request offers the policy: its routed turn (the last user message, or a completion's prompt), whether it
carries tools or images, and its ``metadata``; the first-match engine (``router_policy.py``, model-backed conditions
on our own models via ``routing.evaluate``) decides. The decision is kept in the request's scope: every API's reply
carries it in the ``x-lemonade-route`` header (:class:`RouteHeader`: the matched rule id, or ``default``), and a body
asking ``route_trace: true`` gets the decision as ``x_lemonade_route`` in an OpenAI reply or a stream's first event.
Each decision of a request that runs counts in ``/stats`` and ``/metrics`` (:func:`count`), with a switch when a
conversation's turn goes to another candidate than its turn before.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lemonade_inferos.errors import InferosError
from lemonade_inferos.host.registry import ROUTER_RECIPE
from lemonade_inferos.host.router_policy import Decision, RouteInput, RouterPolicy
from lemonade_inferos.host.routing import evaluate, parse_policy
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import parsed_body

ROUTE_HEADER = b"x-lemonade-route"
SCOPE_KEY = "inferos.route_decision"
CONVERSATION_KEY = "inferos.route_conversation"
PULL_ONLY = ("stream",)   # a pull body's own fields, not the policy's
IMAGE_PARTS = ("image_url", "image", "input_image")


def register(host: Any, document: dict[str, Any]) -> str:
    """Check a policy document against the registry and keep it: every component a registered model that is not
    itself a router, every model-backed condition one this host can run (``semantic_similarity`` needs an
    embedding model, which this host does not serve). Returns the collection's name.

    Raises:
        APIError: 400 naming what is wrong; nothing is registered.
    """
    document = {k: v for k, v in document.items() if k not in PULL_ONLY}
    if "model" in document and "model_name" not in document:   # the OpenAI-style name of a management body
        document["model_name"] = document.pop("model")
    policy = parse_policy(document)
    name = policy.model_name or ""
    if not name.startswith("user.") or name == "user.":
        raise APIError(400, "invalid_routing_policy", "Invalid routing policy: model_name: a router collection is "
                       "registered under user.NAME", param="model_name")
    for component in policy.components:
        _check_component(host, component)
    for classifier in policy.routing.classifiers:
        if classifier.type == "semantic_similarity":
            raise APIError(400, "invalid_routing_policy", f"Invalid routing policy: classifier {classifier.id!r}: "
                           f"semantic_similarity needs an embedding model and {classifier.model} is an LLM (this "
                           "host serves no embedding models); use a type 'llm' classifier", param="routing.classifiers")
    host.registry.register_router(name, policy.model_dump(mode="json", exclude_unset=True), policy.components)
    return name


def _check_component(host: Any, component: str) -> None:
    try:
        info = host.registry.get(component)
    except InferosError as exc:
        raise APIError(400, "invalid_routing_policy", f"Invalid routing policy: components: {component!r} is not a "
                       f"registered model ({exc})", param="components") from None
    if info.get("recipe") == ROUTER_RECIPE:
        raise APIError(400, "invalid_routing_policy", f"Invalid routing policy: components: {component!r} is a "
                       "router collection; a router picks among models, not among routers", param="components")


async def routed_model(request: Request, host: Any, name: str | None, messages: list[dict] | None,
                       text: str | None) -> str | None:
    """The model a request runs on: ``name`` itself, or, when it names a router collection, the candidate its
    policy picks (the decision kept for the reply)."""
    collection = host.registry.canonical(name) if name else None
    document = host.registry.router_policy(collection) if collection else None
    if document is None:
        return name
    body = parsed_body(request)
    body = body if isinstance(body, dict) else {}
    decision = await evaluate(host, RouterPolicy.model_validate(document), route_input(body, messages, text))
    request.scope[SCOPE_KEY] = decision
    request.scope[CONVERSATION_KEY] = conversation_key(collection, messages, text)
    return decision.route_to


def count(request: Request, host: Any) -> None:
    """Count a routed request's decision once it is admitted to run (counting its tokens is no decision)."""
    decision = decision_of(request)
    if decision is not None:
        host.host_stats.record_route(request.scope[CONVERSATION_KEY], decision.route_to)


def route_input(body: dict[str, Any], messages: list[dict] | None, text: str | None) -> RouteInput:
    """The routed turn is the last user message (a completion: its prompt)."""
    users = [m.get("content") for m in messages or () if m.get("role") == "user"]
    turn = (users[-1] if users else "") if messages is not None else (text or "")
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return RouteInput(turn if isinstance(turn, str) else "", bool(body.get("tools")), carries_images(body),
                      {k: v for k, v in metadata.items() if isinstance(v, str)})


def carries_images(body: dict[str, Any]) -> bool:
    """Whether a body sends images: OpenAI or Anthropic content parts, Ollama's ``images``."""
    if body.get("images"):
        return True
    for message in body.get("messages") or body.get("input") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if message.get("images") or (isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") in IMAGE_PARTS for part in content)):
            return True
    return False


def conversation_key(collection: str, messages: list[dict] | None, text: str | None) -> str:
    """A conversation is its collection and its first user message (later turns keep both)."""
    first = next((m.get("content") for m in messages or () if m.get("role") == "user"), None)
    opening = str(first) if messages is not None else (text or "")[:4096]
    return hashlib.sha256(f"{collection}\0{opening}".encode("utf-8", "surrogatepass")).hexdigest()


def decision_of(request: Request) -> Decision | None:
    return request.scope.get(SCOPE_KEY)


def route_field(request: Request) -> dict[str, Any]:
    """``{"x_lemonade_route": decision}`` for a routed request whose body asked ``route_trace: true``, else {}."""
    decision = decision_of(request)
    body = parsed_body(request)
    if decision is None or not isinstance(body, dict) or body.get("route_trace") is not True:
        return {}
    return {"x_lemonade_route": decision.to_dict()}


class RouteHeader:
    """Every routed reply says where it went: ``x-lemonade-route`` is the matched rule id, or ``default``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_routed(message: Message) -> None:
            decision = scope.get(SCOPE_KEY)
            if message["type"] == "http.response.start" and decision is not None:
                printable = "".join(c for c in decision.matched_rule if c.isprintable()) or "default"
                rule = printable.encode("utf-8", "replace")
                message = {**message, "headers": [*message.get("headers", ()), (ROUTE_HEADER, rule)]}
            await send(message)

        await self.app(scope, receive, send_routed)
