"""JSON request bodies read off the event loop, bounded in depth, with lone surrogates made text.

A body is parsed on the event loop by FastAPI unless a route says otherwise, so an 8 MiB body stalls every other
client (health checks, other streams) for as long as ``json.loads`` and the walk below take. Routes of the
:class:`OffLoopJSONRoute` class parse in a worker thread instead (FastAPI's documented custom-route pattern), and:

- **depth**: a body nested deeper than :data:`MAX_DEPTH` is refused (``json.loads`` itself would raise
  ``RecursionError`` at ~1,000 levels, and code that walks the parsed value recursively, a YAML dump or a schema
  walk, at fewer);
- **invalid UTF-8** is refused with its offset;
- **lone surrogates** (``"\\ud800"``, what JavaScript sends when it cuts a string inside an emoji) become U+FFFD,
  as a browser's ``TextEncoder`` does, so text reaches the tokenizer as text it can encode.

Every refusal is a :class:`json.JSONDecodeError`, which FastAPI answers as a validation error of type
``json_invalid`` (the host's handler: 400 ``invalid_json``). The parsed value is kept in the request's scope, so an
error handler that needs a field of it (``stream``) does not parse the body again.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from lemonade_inferos.http.errors import APIError

MAX_DEPTH = 128           # arrays and objects inside each other; a chat body is ~6 deep, a JSON schema ~20
SCOPE_KEY = "inferos.json_body"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body.

    Raises:
        json.JSONDecodeError: not UTF-8, not JSON, or nested deeper than :data:`MAX_DEPTH`.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(not_utf8(raw, exc), "", exc.start) from exc
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", 0) from exc
    # only a \uD800-\uDFFF escape can carry a surrogate: raw UTF-8 cannot encode one
    return _checked(value, repair=_SURROGATE_ESCAPE.search(raw) is not None)


def not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    """The message for a body that is not UTF-8, naming the first bad byte and its offset."""
    return f"the body is not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})"


def _checked(value: Any, repair: bool) -> Any:
    """``value`` with its depth checked and, when ``repair``, lone surrogates in its strings replaced (in place).

    Iterative: the walk itself must not recurse as deep as the body does.
    """
    if not isinstance(value, (dict, list)):
        return _text(value) if repair and isinstance(value, str) else value
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", 0)
        items = list(node.items()) if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
            elif repair and isinstance(item, str):
                node[key] = _text(item)
            if repair and isinstance(key, str) and _has_surrogate(key):
                node[_text(key)] = node.pop(key)
    return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (pairs were already joined by ``json.loads``)."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _has_surrogate(text) else text


class OffLoopJSONRequest(Request):
    """A request whose JSON body is parsed in a worker thread (see the module docstring)."""

    async def json(self) -> Any:
        if SCOPE_KEY not in self.scope:
            raw = await self.body()
            self.scope[SCOPE_KEY] = await asyncio.to_thread(parse_json_body, raw)
        return self.scope[SCOPE_KEY]


class OffLoopJSONRoute(APIRoute):
    """An API route whose handler sees an :class:`OffLoopJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler


def parsed_body(request: Request) -> Any:
    """The body an :class:`OffLoopJSONRequest` parsed for this request, else None (not parsed, or not JSON)."""
    return request.scope.get(SCOPE_KEY)


async def json_object(request: Request, what: str) -> dict[str, Any]:
    """The body of a route that reads it itself, as a JSON object (``what`` says what the object holds).

    Raises:
        APIError: 400 ``invalid_json`` (see :func:`parse_json_body`), or ``invalid_request`` for another value.
    """
    assert isinstance(request, OffLoopJSONRequest), "this indicates a bug: the route is not an OffLoopJSONRoute"
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise APIError(400, "invalid_json", f"the body is not valid JSON: {exc.msg}", position=exc.pos) from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", f"the body must be a JSON object of {what}")
    return body
