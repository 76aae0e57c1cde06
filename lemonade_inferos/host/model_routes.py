"""Lemonade's model management routes: the catalog, per-model options, load and unload, pull, register, delete
and the default sampling parameters.

Mounted under /api/v1, /api/v0, /v1 and /v0 by the app factory, beside the generation routes (``routes.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lemonade_inferos.errors import InferosError
from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import recipe_options, route_dispatch
from lemonade_inferos.host.registry import ROUTER_RECIPE
from lemonade_inferos.host.schemas import LoadRequest, ParamsRequest, PullRequest, UnloadRequest
from lemonade_inferos.host.serving import host_of
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.handlers import inferos_error_body
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

router = APIRouter(route_class=OffLoopJSONRoute)


@router.get("/models")
async def list_models(request: Request, show_all: bool = False):
    host = host_of(request)
    data = []
    for name, info in host.registry.all().items():
        downloaded = host.registry.is_downloaded(name)
        if downloaded or show_all:
            data.append(_model_entry(host, name, info, downloaded))
    return {"object": "list", "data": data}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request):
    host = host_of(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    return _model_entry(host, name, info, host.registry.is_downloaded(name))


def _model_entry(host: Any, name: str, info: dict[str, Any], downloaded: bool) -> dict[str, Any]:
    """A model as Lemonade lists it; ``context_length`` is the one it runs with when loaded, else the one a load
    would use now (never the ``-1`` "automatic" marker)."""
    options = _options(host, name, info)
    loaded = host.models.loaded.get(name)
    entry = {"id": name, "object": "model", "created": 0, "owned_by": "lemonade", "checkpoint": info["checkpoint"],
             "recipe": info["recipe"], "downloaded": downloaded, "suggested": info.get("suggested", False),
             "labels": info.get("labels", []), "size": info.get("size"),
             "recipe_options": {k: v for k, v in options["effective"].items() if k != "model_name"}}
    context_length = loaded.ctx_size if loaded else options["resolved_ctx_size"]
    if context_length:
        entry["context_length"] = context_length
    ceiling = loaded.model_ctx if loaded else host.registry.context_length(name)
    if ceiling:
        entry["max_context_window"] = ceiling  # the model's trained context (GAIA's ceiling for ctx_size)
    return entry


def _options(host: Any, name: str, info: dict[str, Any], pending: dict[str, Any] | None = None) -> dict[str, Any]:
    store = host.models.options
    return recipe_options.options_document(name, info.get("recipe", "oga-cpu"), store.saved(name),
                                           host.settings.ctx_size, host.registry.context_length(name), pending)


@router.get("/models/{model_id}/options")
async def get_model_options(model_id: str, request: Request):
    host = host_of(request)
    name = host.registry.canonical(model_id)
    return _options(host, name, host.registry.get(name))


@router.post("/models/{model_id}/options")
async def save_model_options(model_id: str, request: Request):
    """Merge the body's options into the model's saved ones (``null`` removes one; ``dry_run`` saves nothing);
    a loaded model keeps its options until it is next loaded."""
    host = host_of(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    body = await json_object(request, "recipe options")
    dry_run = body.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise APIError(400, "invalid_request", "dry_run must be a boolean", param="dry_run")
    entry = host.models.options.save(name, info.get("recipe", "oga-cpu"), body, dry_run=dry_run)
    return _options(host, name, info, pending=entry if dry_run else None)


@router.delete("/models/{model_id}/options")
async def reset_model_options(model_id: str, request: Request):
    host = host_of(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    host.models.options.reset(name)
    return _options(host, name, info)


@router.post("/load")
async def load(body: LoadRequest, request: Request):
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    model = await host_of(request).models.load(body.name, body.ctx_size, save_options=body.save_options,
                                             pinned=body.pinned)
    return {"status": "success", "message": f"Loaded model: {model.name}", "model_name": model.name,
            "recipe_options": {"ctx_size": model.ctx_size}}


@router.post("/unload")
async def unload(request: Request, body: UnloadRequest | None = None):
    names = await host_of(request).models.unload(body.name if body else None)
    return {"status": "success", "message": f"Unloaded: {', '.join(names) or 'nothing'}"}


@router.post("/pull")
async def pull(body: PullRequest, request: Request):
    """Build a built-in model, register a local folder, or register a router policy (``collection.router``,
    ``route_dispatch.py``); ``stream`` sends Lemonade's SSE progress events (a
    ``progress`` event per build step, then ``complete``, or ``error``)."""
    host = host_of(request)
    if body.recipe == ROUTER_RECIPE:   # a router policy: registered, nothing to build
        name = await asyncio.to_thread(route_dispatch.register, host, body.model_dump(exclude_unset=True))
        return {"status": "success", "message": f"Installed model: {name}", "model_name": name}
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    name = host.registry.canonical(body.name)
    if not name.startswith("user."):
        host.registry.get(name)  # an unknown built-in is a 404 before any stream starts
    elif not body.main_checkpoint and name not in host.registry.all():
        raise APIError(400, "invalid_request", f"registering {name} needs a checkpoint: the path of an "
                       "onnxruntime-genai model folder (checkpoint, or checkpoints.main)", model=name)
    if not body.stream:
        folder = await asyncio.to_thread(host.registry.pull, name, body.main_checkpoint, body.recipe)
        return {"status": "success", "message": f"Installed model: {body.name}", "path": str(folder)}
    return StreamingResponse(_pull_events(host, name, body), media_type="text/event-stream")


async def pull_steps(host: Any, name: str, checkpoint: str | None = None, recipe: str | None = None
                     ) -> AsyncIterator[tuple[str, Any]]:
    """A pull in a worker thread, as it goes: ``("progress", message)`` per build step, then ``("done", folder)``
    or ``("error", (status, message))`` (a stream has begun: a failure is its last item, not an exception)."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()
    job = asyncio.ensure_future(asyncio.to_thread(
        host.registry.pull, name, checkpoint, recipe,
        progress=lambda msg: loop.call_soon_threadsafe(steps.put_nowait, msg)))
    while not (job.done() and steps.empty()):
        getter = asyncio.ensure_future(steps.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        yield "progress", getter.result()
    try:
        yield "done", job.result()
    except Exception as exc:
        status, payload = inferos_error_body(exc) if isinstance(exc, InferosError) else (500, None)
        yield "error", (status, payload["error"]["message"] if payload else f"pull failed: {exc!r}")


async def _pull_events(host: Any, name: str, body: PullRequest):
    """Lemonade's SSE: a ``progress`` event per build step, then ``complete`` or ``error``."""
    index = 0
    async for kind, value in pull_steps(host, name, body.main_checkpoint, body.recipe):
        if kind == "progress":
            index += 1
            yield fmt.sse({"file": value, "file_index": index, "total_files": None, "bytes_downloaded": 0,
                           "bytes_total": 0, "percent": None}, event="progress")
        elif kind == "error":
            yield fmt.sse({"error": value[1], "status": value[0]}, event="error")
        else:
            size = sum(f.stat().st_size for f in value.rglob("*") if f.is_file())
            yield fmt.sse({"file_index": index, "total_files": index, "percent": 100, "bytes_total": size,
                           "path": str(value)}, event="complete")


@router.post("/models/register")
async def register(body: PullRequest, request: Request):
    """Lemonade's register-without-download: here a ``user.*`` model is a local folder, so registering it is
    pulling it (nothing is downloaded either way)."""
    host = host_of(request)
    name = body.name or ""
    if not name.startswith("user."):
        raise APIError(400, "invalid_request", "model_name must be a non-empty name under user.*", model=name)
    if not body.main_checkpoint:
        raise APIError(400, "invalid_request", f"registering {name} needs a checkpoint: the path of an "
                       "onnxruntime-genai model folder", model=name)
    await asyncio.to_thread(host.registry.pull, name, body.main_checkpoint, body.recipe)
    info = host.registry.get(name)
    return {"status": "success", "model_name": name, "canonical_model_name": name,
            "model": {"id": name, "recipe": info["recipe"], "downloaded": host.registry.is_downloaded(name)}}


@router.post("/delete")
async def delete(body: PullRequest, request: Request):
    host = host_of(request)
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    name = host.registry.canonical(body.name)
    if name not in host.registry.all():  # Lemonade answers an unknown model's delete with 422
        raise APIError(422, "model_not_found", f"model '{body.name}' is not in the registry", model=body.name)
    if name in host.models.loaded:
        await host.models.unload(name)
    host.registry.delete(name)
    host.models.options.reset(name)
    return {"status": "success", "message": f"Deleted model: {body.name}"}


@router.post("/params")
async def params(body: ParamsRequest, request: Request):
    """Defaults for later requests, and Lemonade's ``telemetry`` block (validated whole before anything
    changes: a bad block is a 400 and the sampling defaults of the same body are not stored either)."""
    host = host_of(request)
    if body.telemetry is not None:
        host.telemetry.update(body.telemetry)
    host.default_params.update(body.model_dump(exclude_none=True, exclude={"model", "telemetry"}))
    return {"status": "success", "params": host.default_params,
            "telemetry": host.telemetry.settings.model_dump(exclude={"otlp": {"headers"}})}
