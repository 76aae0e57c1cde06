"""Lemonade's ``/internal`` routes this host serves: runtime settings, pinning and the telemetry flush.

``POST /internal/set`` takes a partial settings object (Lemonade's ``config.json`` shape) and applies what this
host can change while it runs: the ``telemetry`` block, the server-wide ``ctx_size`` used by later loads,
``max_loaded_models`` and ``extra_models_dir``. Any other key is a 400 naming it, so a client never believes a setting took effect when it
did not; every key is validated before any is applied. ``POST /internal/pin`` pins or unpins a loaded model;
``/internal/aliases`` lists, sets and removes model aliases (``aliases.py``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fastapi import APIRouter, Request

from lemonade_inferos.host.aliases import AliasConflict
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

router = APIRouter(prefix="/internal", route_class=OffLoopJSONRoute)
SETTABLE = ("telemetry", "ctx_size", "max_loaded_models", "extra_models_dir")
MAX_CTX = 2**31 - 1   # a context length an int32 holds: ONNX Runtime's and og.Generator's sequence lengths


@router.get("/config")
async def config(request: Request):
    host = request.app.state.host
    return {"ctx_size": host.settings.ctx_size if host.settings.ctx_size is not None else -1,
            "max_loaded_models": host.settings.max_loaded_models,
            "extra_models_dir": str(host.settings.extra_models_dir or ""),
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
    if "ctx_size" in body and not (_integer(ctx) and (ctx == -1 or 16 <= ctx <= MAX_CTX)):
        raise APIError(400, "invalid_request", f"ctx_size is a context length of 16 to {MAX_CTX} tokens, or -1",
                       param="ctx_size")
    most = body.get("max_loaded_models")
    if "max_loaded_models" in body and not (_integer(most) and most >= 1):
        raise APIError(400, "invalid_request", "max_loaded_models is a count of at least 1",
                       param="max_loaded_models")
    extra = _extra_models_dir(body) if "extra_models_dir" in body else None
    if "telemetry" in body:
        host.telemetry.update(body["telemetry"])   # validated whole first: a 400 here changes nothing
    if "ctx_size" in body:
        host.settings.ctx_size = None if ctx == -1 else ctx
    if "max_loaded_models" in body:
        host.settings.max_loaded_models = most   # the next load makes room by it; loaded models stay
    if "extra_models_dir" in body:   # "" turns it off
        host.settings.extra_models_dir = host.registry.extra_models_dir = extra
    return {"status": "success", "updated": {key: body[key] for key in sorted(body)}, "applied": sorted(body)}


def _extra_models_dir(body: dict) -> Path | None:
    """The ``extra_models_dir`` asked for; an existing but unreadable folder, or not a folder, is a 400 (as
    Lemonade 11.7 answers), a missing one is kept (its files are listed once it exists)."""
    value = body["extra_models_dir"]
    if not isinstance(value, str):
        raise APIError(400, "invalid_request", "extra_models_dir is a folder path, or \"\" for none",
                       param="extra_models_dir")
    if not value:
        return None
    folder = Path(value).expanduser()
    if folder.exists() and (not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK)):
        raise APIError(400, "invalid_request", f"extra_models_dir {value!r} exists but is not a readable folder",
                       param="extra_models_dir")
    return folder


@router.post("/pin")
async def pin(request: Request):
    """Pin or unpin a loaded model without reloading it (``model_name``, or ``model``)."""
    host = request.app.state.host
    body = await json_object(request, "pin")
    name = body.get("model_name") or body.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "invalid_request", "model_name is required", param="model_name")
    if not isinstance(body.get("pinned"), bool):
        raise APIError(400, "invalid_request", "pinned is required: true or false", param="pinned")
    loaded = host.models.loaded.get(host.registry.canonical(name))
    if loaded is None:
        raise APIError(400, "model_not_loaded", f"model '{name}' is not loaded", param="model_name",
                       loaded=list(host.models.loaded))
    loaded.pinned = body["pinned"]
    return {"model_name": name, "pinned": loaded.pinned, "status": "success"}


@router.get("/aliases")
async def list_aliases(request: Request):
    """Every model alias with the model it points to (Lemonade's ``recipe`` is llamacpp for an unknown target)."""
    registry = request.app.state.host.registry
    models = registry.all()
    return {"aliases": [{"alias": alias, "target": target,
                         "downloaded": target in models and registry.is_downloaded(target),
                         "recipe": models[target].get("recipe", "oga-cpu") if target in models else "llamacpp"}
                        for alias, target in sorted(registry.aliases.all().items())]}


@router.post("/aliases")
async def set_alias(request: Request):
    """Point ``alias`` at ``target`` (or ``model``), creating or updating it."""
    registry = request.app.state.host.registry
    body = await json_object(request, "alias")
    alias, target = body.get("alias"), body.get("target", body.get("model"))
    if not isinstance(alias, str) or not isinstance(target, str):
        raise APIError(400, "invalid_request", "alias and target are required strings",
                       param="alias" if not isinstance(alias, str) else "target")
    try:
        registry.aliases.set(alias, target, set(registry.all()))
    except AliasConflict as exc:
        raise APIError(409, exc.code, exc.message, **exc.details) from exc
    return {"alias": alias, "status": "ok", "target": target}


@router.delete("/aliases/{alias}")
async def delete_alias(alias: str, request: Request):
    if not request.app.state.host.registry.aliases.remove(alias):
        raise APIError(404, "alias_not_found", f"no alias '{alias}'", alias=alias)
    return {"alias": alias, "status": "deleted"}


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@router.post("/telemetry/flush")
async def flush(request: Request):
    """Export the queued spans now (Lemonade batches them like this host does)."""
    host = request.app.state.host
    flushed = await asyncio.to_thread(host.telemetry.flush)
    return {"status": "flushed" if flushed else "timeout", "spans_exported": host.telemetry.counts["exported"],
            "spans_failed": host.telemetry.counts["failed"]}
