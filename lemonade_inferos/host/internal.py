"""Lemonade's ``/internal`` routes this host serves: runtime settings and the telemetry flush.

``POST /internal/set`` takes a partial settings object (Lemonade's ``config.json`` shape) and applies what this
host can change while it runs: the ``telemetry`` block and the server-wide ``ctx_size`` used by later loads.
Any other key is a 400 naming it, so a client never believes a setting took effect when it did not.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

router = APIRouter(prefix="/internal", route_class=OffLoopJSONRoute)
SETTABLE = ("telemetry", "ctx_size")


@router.get("/config")
async def config(request: Request):
    host = request.app.state.host
    return {"ctx_size": host.settings.ctx_size if host.settings.ctx_size is not None else -1,
            "max_loaded_models": host.settings.max_loaded_models,
            "telemetry": host.telemetry.settings.model_dump(exclude={"otlp": {"headers"}})}


@router.post("/set")
async def set_config(request: Request):
    host = request.app.state.host
    body = await json_object(request, "settings")
    if not body:
        raise APIError(400, "invalid_request", "the body must be a non-empty object of settings")
    unknown = sorted(set(body) - set(SETTABLE))
    if unknown:
        raise APIError(400, "invalid_request", f"settings this host cannot change at run time: {unknown}; "
                       f"settable: {list(SETTABLE)}", unknown=unknown)
    ctx = body.get("ctx_size", host.settings.ctx_size)
    if "ctx_size" in body and not (isinstance(ctx, int) and not isinstance(ctx, bool) and (ctx == -1 or ctx >= 16)):
        raise APIError(400, "invalid_request", "ctx_size is a context length of at least 16 tokens, or -1",
                       param="ctx_size")
    if "telemetry" in body:
        host.telemetry.update(body["telemetry"])   # validated whole first: a 400 here changes nothing
    if "ctx_size" in body:
        host.settings.ctx_size = None if ctx == -1 else ctx
    return {"status": "success", "applied": sorted(body)}


@router.post("/telemetry/flush")
async def flush(request: Request):
    """Export the queued spans now (Lemonade batches them like this host does)."""
    host = request.app.state.host
    flushed = await asyncio.to_thread(host.telemetry.flush)
    return {"status": "success" if flushed else "timeout", "spans_exported": host.telemetry.counts["exported"],
            "spans_failed": host.telemetry.counts["failed"]}
