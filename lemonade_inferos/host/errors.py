"""HTTP errors in the design document's shape, OpenAI-compatible too.

    {"error": {"code": "...", "message": "...", "details": {...}, "type": "invalid_request_error"}}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemonade_inferos.errors import GenerationError, InferosError, ModelFolderError, ModelNotFoundError

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error", 503: "server_busy", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_body(status: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {},
                      "type": OPENAI_TYPES.get(status, "invalid_request_error")}}


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, details), status_code=status)


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
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}",
                              {"errors": _jsonable(errors)})

    @app.exception_handler(ModelNotFoundError)
    async def _not_found(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, exc.code, exc.message, exc.details)

    @app.exception_handler(GenerationError)
    async def _generation(_: Request, exc: GenerationError) -> JSONResponse:
        code = "context_length_exceeded" if "context holds" in exc.message else exc.code
        return error_response(400, code, exc.message, exc.details)

    @app.exception_handler(ModelFolderError)
    async def _folder(_: Request, exc: ModelFolderError) -> JSONResponse:
        return error_response(400, exc.code, exc.message, exc.details)

    @app.exception_handler(InferosError)
    async def _inferos(_: Request, exc: InferosError) -> JSONResponse:
        return error_response(500, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": list(map(str, e.get("loc", ()))), "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors]
