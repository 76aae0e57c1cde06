"""Exception handlers of the host app: every error leaves in the shape of ``lemonade_inferos.http.errors``.

A caller's mistake is a 4xx; only the server's own faults are 5xx (and the fuzz test holds it to that).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemonade_inferos.errors import (GenerationError, InferosError, ModelFolderError, ModelNotFoundError,
                                     RequestError, RequestTimeout, ServerStopping)
from lemonade_inferos.http.errors import APIError, error_body, error_response  # noqa: F401 (re-exported)

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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON",
                                  {"errors": _jsonable(errors)})
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}",
                              {"errors": _jsonable(errors)})

    @app.exception_handler(InferosError)
    async def _inferos(_: Request, exc: InferosError) -> JSONResponse:
        status, body = inferos_error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": list(map(str, e.get("loc", ()))), "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors]
