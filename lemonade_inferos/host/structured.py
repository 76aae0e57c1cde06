"""Structured output: OpenAI's ``response_format`` (chat) and ``text.format`` (Responses) as a Guidance.

``json_object`` constrains the reply to one JSON object, ``json_schema`` to its schema (strict or not, the reply
matches it: the grammar is enforced token by token, ``engine/guidance.py``); ``text`` is unconstrained. A schema
llguidance cannot compile is a 400 before any response starts.
"""

from __future__ import annotations

import copy
from typing import Any

from lemonade_inferos.engine.guidance import JSON_OPTIONS, Guidance
from lemonade_inferos.errors import GenerationError
from lemonade_inferos.http.errors import APIError


I_JSON_LIMIT = 2**53 - 1   # RFC 7493 (I-JSON): integers beyond this are not interoperable


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with llguidance's options for compact JSON (both engines read them from the schema itself), and
    every integer without bounds bounded to I-JSON's range: a small model otherwise writes digits until its token
    budget runs out (measured: 18 of 50 SmolLM2 replies at temperature 0.7 ended inside a population number)."""
    out = _bounded(copy.deepcopy(schema))
    out.setdefault("x-guidance", dict(JSON_OPTIONS))
    return out


def _bounded(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "integer" or (isinstance(node.get("type"), list) and "integer" in node["type"]):
            if not any(k in node for k in ("maximum", "exclusiveMaximum")):
                node["maximum"] = I_JSON_LIMIT
            if not any(k in node for k in ("minimum", "exclusiveMinimum")):
                node["minimum"] = -I_JSON_LIMIT
        for value in node.values():
            _bounded(value)
    elif isinstance(node, list):
        for value in node:
            _bounded(value)
    return node


def guidance_for(response_format: dict[str, Any] | None) -> Guidance | None:
    """The constraint of a ``response_format`` (or a Responses ``text.format``) object.

    Raises:
        APIError: 400 for an unknown type, a missing or invalid schema.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        guidance = Guidance.json_schema(compact({"type": "object"}))
    elif kind == "json_schema":
        spec = response_format.get("json_schema", response_format)  # Responses puts the schema at the top
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "invalid_response_format", "response_format json_schema needs a 'schema' object",
                           param="response_format")
        guidance = Guidance.json_schema(compact(schema))
    else:
        raise APIError(400, "invalid_response_format", f"response_format type {kind!r} is not one of text, "
                       "json_object, json_schema", param="response_format")
    try:
        guidance.validate()
    except GenerationError as exc:
        raise APIError(400, "invalid_response_format", exc.message, param="response_format") from exc
    return guidance
