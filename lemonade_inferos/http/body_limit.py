"""The request body limit: a body over it is refused before it is read whole, let alone parsed.

Without one, a 50 MB paste was read, decoded and parsed on the event loop (77 s of ``/health`` unanswered, 5 GB of
RSS) before it was refused. A ``Content-Length`` over the limit is answered 413 at once, nothing read; a chunked
body is counted as it arrives and refused once it passes the limit. Both answers are the servers' error shape
(FastAPI's own ``max_body_size`` answers a declared length over it in plain text, whatever the app would send).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

from lemonade_inferos.http.errors import error_response


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the bytes read pass the limit (the app's handler answers it)."""

    def __init__(self, limit: int, setting: str | None) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes")
        self.limit, self.setting = limit, setting

    def response(self):
        return too_large_response(self.limit, self.setting)


def too_large_response(limit: int, setting: str | None):
    return error_response(413, "request_too_large",
                          f"the request body is larger than this server's limit of {limit:,} bytes"
                          + (f" (raise it with {setting})" if setting else ""), {"max_body_bytes": limit})


class BodyLimit:
    """ASGI middleware: at most ``limit`` bytes of request body; ``setting`` names how a user raises it."""

    def __init__(self, app: Any, limit: int, setting: str | None = None) -> None:
        self.app, self.limit, self.setting = app, limit, setting

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await too_large_response(self.limit, self.setting)(scope, receive, send)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit, self.setting)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
