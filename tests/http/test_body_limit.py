"""The body limit refuses a body over it before the app reads it, declared or chunked, in the error shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemonade_inferos.http.body_limit import BodyLimit, BodyTooLarge

LIMIT = 1000


def _client() -> tuple[TestClient, list[int]]:
    app, read = FastAPI(), []

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        read.append(len(body))
        return {"bytes": len(body)}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # what the host's handler does with it
        assert isinstance(exc, BodyTooLarge)
        return exc.response()

    app.add_middleware(BodyLimit, limit=LIMIT, setting="--max-body-mb")
    return TestClient(app), read


def test_a_declared_length_over_the_limit_is_a_413_and_the_app_never_runs():
    client, read = _client()
    reply = client.post("/echo", content=b"x" * (LIMIT + 1))
    assert reply.status_code == 413 and read == []
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and "--max-body-mb" in error["message"]
    assert error["details"]["max_body_bytes"] == LIMIT


def test_a_chunked_body_is_counted_as_it_arrives_and_refused_once_over_the_limit():
    client, read = _client()
    reply = client.post("/echo", content=(b"x" * 300 for _ in range(4)))  # no Content-Length: chunked
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large" and read == []


def test_bodies_up_to_the_limit_pass_whole():
    client, read = _client()
    for size in (0, 1, LIMIT):
        assert client.post("/echo", content=b"x" * size).json() == {"bytes": size}
    assert client.post("/echo", content=(b"x" * 250 for _ in range(4))).json() == {"bytes": LIMIT}
