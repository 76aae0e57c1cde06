"""``POST /routing/validate``: a router policy (``router_policy.py``) evaluated against a prompt, without registering
it or sending the prompt on to the chosen candidate.

Model-backed conditions run on this host's own models: an ``llm`` classifier, and a ``classifier`` entry (an
LLM-as-classifier here: this host serves no encoder classifiers), ask the entry's model for exactly one of its labels
with the output constrained to them (llguidance), so the reply is always a label; the chosen one scores 1.0. A
``semantic_similarity`` entry needs an embedding model, which this host does not serve: it follows its ``on_error``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.host import structured
from lemonade_inferos.host.generate import collect, new_request_id
from lemonade_inferos.host.router_policy import Classifier, Decision, RouteInput, RouterPolicy, decide
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

router = APIRouter(route_class=OffLoopJSONRoute)
LABEL_TOKENS = 32   # a label is a few tokens; the grammar ends the reply as soon as one is complete


@router.post("/routing/validate")
async def validate(request: Request):
    body = await json_object(request, "routing validation: {\"policy\": {...}, \"prompt\": \"...\"}")
    policy = parse_policy(body.get("policy"))
    decision = await evaluate(request.app.state.host, policy, _route_input(body))
    return {"decision": decision.to_dict(),
            "normalized_policy": policy.normalized().model_dump(exclude_unset=True)}


async def evaluate(host: Any, policy: RouterPolicy, given: RouteInput) -> Decision:
    """The policy's decision for ``given``, in a worker thread; a model-backed condition's generation is run from
    there on the event loop, like any request's."""
    loop = asyncio.get_running_loop()

    def scorer(classifier: Classifier, route_input: RouteInput) -> dict[str, float]:
        return asyncio.run_coroutine_threadsafe(llm_scores(host, classifier, route_input), loop).result()

    return await asyncio.to_thread(decide, policy, given, scorer)


def parse_policy(document: Any) -> RouterPolicy:
    if not isinstance(document, dict):
        raise APIError(400, "invalid_request", "policy is required: a collection.router policy object",
                       param="policy")
    try:
        return RouterPolicy.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "policy"
        raise APIError(400, "invalid_routing_policy", f"Invalid routing policy: {where}: {first['msg']}",
                       errors=[{"loc": list(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]) from None


def _route_input(body: dict[str, Any]) -> RouteInput:
    prompt, metadata = body.get("prompt", ""), body.get("metadata", {})
    if not isinstance(prompt, str):
        raise APIError(400, "invalid_request", "prompt must be a string", param="prompt")
    for flag in ("has_images", "has_tools"):
        if not isinstance(body.get(flag, False), bool):
            raise APIError(400, "invalid_request", f"{flag} must be true or false", param=flag)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise APIError(400, "invalid_request", "metadata must be an object of string values", param="metadata")
    return RouteInput(prompt, bool(body.get("has_tools", False)), bool(body.get("has_images", False)), metadata)


async def llm_scores(host: Any, classifier: Classifier, given: RouteInput) -> dict[str, float]:
    """The classifier's model picks one of its labels for the request (greedy, constrained to the labels)."""
    if classifier.type == "semantic_similarity":
        raise ValueError("semantic_similarity needs an embedding model; this host serves LLMs only")
    if not classifier.labels:
        raise ValueError(f"classifier {classifier.id!r} declares no labels")
    model = await host.models.resolve(classifier.model)
    messages = [{"role": "system", "content": f"{classifier.prompt or 'Classify the request.'}\n"
                                              f"Reply with exactly one label: {', '.join(classifier.labels)}."},
                {"role": "user", "content": given.text}]
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = await asyncio.to_thread(model.tokenizer.encode_within, text, model.ctx_size)
    guidance = structured.guidance_for({"type": "json_schema", "json_schema": {"schema": {"enum": classifier.labels}}})
    params = SamplingParams(max_tokens=LABEL_TOKENS, guidance=guidance)
    reply, _ = await collect(host.generator.open(model, ids, params, "routing/validate", new_request_id()))
    label = json.loads(reply)
    return {name: 1.0 if name == label else 0.0 for name in classifier.labels}
