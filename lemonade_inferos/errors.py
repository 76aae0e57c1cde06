"""Typed errors the CLI and the server turn into clear messages.

Each carries a machine-readable ``code`` (the design document's error shape is
``{"error": {"code", "message", "details"}}``) and a message that says how to fix it.
"""

from __future__ import annotations

from typing import Any


class InferosError(Exception):
    """Base class: an error a user can act on."""

    code = "inferos_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ModelFolderError(InferosError):
    """A model folder or its genai_config.json is missing or malformed."""

    code = "invalid_model_folder"


class ModelNotFoundError(InferosError):
    """A model name is neither a built-in model nor a folder on disk."""

    code = "model_not_found"


class MissingExtraError(InferosError):
    """An optional dependency group is not installed."""

    code = "missing_dependency"


class RequestError(InferosError, ValueError):
    """The caller's input cannot be served as given (HTTP 400): never a reason to distrust the engine."""

    code = "invalid_request"


def validation_problems(exc: Any, prefix: str = "") -> list[dict[str, str]]:
    """A pydantic ValidationError as ``[{"field", "problem"}]`` (``prefix`` before each field path)."""
    return [{"field": prefix + ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors()]


class RequestTimeout(InferosError):
    """A generation ran past the per-request time limit (``--request-timeout``) and was ended."""

    code = "request_timeout"


class GenerationStalled(RequestTimeout):
    """A generation produced no token for the watchdog's time: it was ended and its engine is rebuilt."""

    code = "generation_stalled"


class ServerStopping(InferosError):
    """The server is shutting down: running generations end, new requests are refused."""

    code = "server_shutting_down"


class GenerationError(RequestError):
    """A generation request cannot be served as asked (bad parameters, prompt too long)."""
