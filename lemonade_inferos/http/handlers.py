"""Exception handlers of both servers (the host and the control API): every error leaves in the shape of
``errors.py``.

A caller's mistake is a 4xx; only the server's own faults are 5xx (and the fuzz test holds it to that).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemonade_inferos.errors import (GenerationError, InferosError, ModelFolderError, ModelNotFoundError,
                                     RequestError, RequestTimeout, ServerStopping)
from lemonade_inferos.http.errors import APIError, error_body, error_response  # noqa: F401 (re-exported)
from lemonade_inferos.http.body_limit import BodyTooLarge
from lemonade_inferos.http.json_body import parsed_body

STATUS_OF = ((ModelNotFoundError, 404), (ModelFolderError, 400), (RequestError, 400), (RequestTimeout, 504),
             (ServerStopping, 503))


def status_of(exc: InferosError) -> int:
    """The HTTP status an InferosError is answered with (500 for anything not a caller's mistake)."""
    return next((status for kind, status in STATUS_OF if isinstance(exc, kind)), 500)


def inferos_error_body(exc: InferosError) -> tuple[int, dict[str, Any]]:
    status = status_of(exc)
    code = "context_length_exceeded" if isinstance(exc, GenerationError) and "context holds" in exc.message \
        else exc.code
    return status, error_body(status, code, exc.message, exc.details)


GENERATE_PATHS = ("/chat/completions", "/completions", "/responses")


async def _streamed(request: Request) -> bool:
    """Whether ``request`` asked for a streamed generation (``"stream": true`` on a generate route; the body as its
    route parsed it, never parsed again here)."""
    if request.method != "POST" or not request.url.path.endswith(GENERATE_PATHS):
        return False
    body = parsed_body(request)
    return isinstance(body, dict) and body.get("stream") is True


async def _answer(request: Request, status: int, body: dict[str, Any]) -> Response:
    """The error as JSON; for a streamed generation whose request was refused (a 400), as Lemonade does: the
    stream opens and carries one ``data: {"error": ...}`` event."""
    if status == 400 and await _streamed(request):
        return StreamingResponse(iter([f"data: {json.dumps(body, separators=(',', ':'))}\n\n"]),
                                 media_type="text/event-stream")
    return JSONResponse(body, status_code=status)


Refused = Callable[[Request, int, str, str], None]   # (request, status, code, message)


def install_error_handlers(app: FastAPI, on_invalid_body: Refused | None = None) -> None:
    """The error shape for every exception; ``on_invalid_body`` is told of each body refused by its schema
    before a route ran (the host records a telemetry span for it)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return await _answer(request, exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        invalid = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if invalid is not None:
            reason = (invalid.get("ctx") or {}).get("error")
            message = "the request body is not valid JSON" + (f": {reason}" if reason else "")
            if on_invalid_body is not None:
                on_invalid_body(request, 400, "invalid_json", message)
            return error_response(400, "invalid_json", message, {"errors": _jsonable(errors)})
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        if on_invalid_body is not None:
            on_invalid_body(request, 400, "invalid_request", message)
        return await _answer(request, 400, error_body(400, "invalid_request", message, {"errors": _jsonable(errors)}))

    @app.exception_handler(InferosError)
    async def _inferos(request: Request, exc: InferosError) -> Response:
        status, body = inferos_error_body(exc)
        return await _answer(request, status, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return exc.response()
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": list(map(str, e.get("loc", ()))), "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors]
