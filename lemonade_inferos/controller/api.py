"""The Infer-OS control API (127.0.0.1 only): health, metrics, policy, baseline, config, history, the dashboard.

Reads are open; every POST needs ``X-Inferos-Token``. Errors use
``{"error": {"code", "message", "details"}}``; responses carry the design
document's security headers; CORS admits loopback origins only.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timezone
from typing import Any

import yaml
from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lemonade_inferos import __version__
from lemonade_inferos.config.files import ConfigError, ConfigSyntaxError, parse_config
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.dashboard import mount_dashboard
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.http.handlers import install_error_handlers
from lemonade_inferos.http.body_limit import BodyLimit
from lemonade_inferos.http.errors import APIError, document_errors_as_400
from lemonade_inferos.http.guard import RequestGuard, TokenRule, guard_policy_from_env
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object, not_utf8
from lemonade_inferos.metrics.prometheus import ControllerCollector

STATS_ADAPTER = TypeAdapter(InferenceStats)
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "X-XSS-Protection": "1; mode=block", "Cache-Control": "no-store"}
MAX_BODY_BYTES = 2**20   # a config document or a policy is a few KiB
LOOPBACK_ORIGINS = r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$"


class BaselineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable: bool


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    context: int = Field(512, ge=64, le=8192, description="tokens of pydoc_data.topics to score")
    delay_s: float = Field(0.0, ge=0.0, le=86_400.0, description="start after this many seconds")


def token_rule(token: str) -> TokenRule:
    """Reads are open; every POST needs ``X-Inferos-Token`` (checked before the body is read)."""
    return TokenRule(token, "x-inferos-token", needs=lambda method, path: method == "POST",
                     message="Unauthorized: a valid X-Inferos-Token header is required")


def _validation_error(exc: ValidationError, code: str = "invalid_policy") -> APIError:
    first = exc.errors()[0]
    field = ".".join(map(str, first["loc"]))
    return APIError(400, code, f"{field}: {first['msg']}",
                    errors=[{"loc": list(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()])


def _utf8(raw: bytes, fmt: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"invalid_{fmt}", not_utf8(raw, exc), position=exc.start) from exc


def create_control_app(controller: Controller, token: str) -> FastAPI:
    app = FastAPI(title="Infer-OS Control Agent", version=__version__)
    install_error_handlers(app)
    document_errors_as_400(app)
    app.add_middleware(CORSMiddleware, allow_origin_regex=LOOPBACK_ORIGINS, allow_methods=["GET", "POST"],
                       allow_headers=["X-Inferos-Token", "Content-Type"])

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.state.controller = controller
    app.state.registry = CollectorRegistry()
    app.state.registry.register(ControllerCollector(controller.snapshot))
    app.include_router(router)
    mount_dashboard(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    # outermost: the host allow-list, cross-site refusal and the token come before CORS, routing and bodies
    app.add_middleware(RequestGuard, policy=guard_policy_from_env(os.environ, token_rule(token)))
    return app


router = APIRouter(prefix="/v1", route_class=OffLoopJSONRoute)


def _controller(request: Request) -> Controller:
    return request.app.state.controller


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    controller = _controller(request)
    return {"status": "healthy", "timestamp": datetime.now(timezone.utc).isoformat(), "version": __version__,
            "policy_version": controller.policy_version, "baseline_mode": controller.use_baseline,
            "guard_level": controller.guard.level}


@router.get("/metrics")
async def metrics(request: Request, view: str = "full") -> dict[str, Any]:
    """The design document's metrics document; ``?view=summary`` its short shape (``tps``, ``ftl_ms``,
    ``mem``, ``util``, ``quality``, ``kv_stats``), whose first four keys the full document carries too."""
    controller = _controller(request)
    if view not in ("full", "summary"):
        raise APIError(400, "invalid_request", "view must be 'full' or 'summary'")
    return controller.summary() if view == "summary" else controller.metrics()


@router.get("/metrics/prometheus")
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(request.app.state.registry).decode(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/policy")
async def get_policy(request: Request) -> dict[str, Any]:
    """The configured policy, the effective one requests run with, and every override between them."""
    controller = _controller(request)
    return controller.policy_document()


@router.post("/policy")
async def set_policy(request: Request, update: dict[str, Any] = Body(...)) -> dict[str, Any]:
    controller = _controller(request)
    try:
        policy = controller.update_policy(update)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    except ConfigError as exc:  # valid as a schema, not here (a draft model that does not exist)
        raise APIError(400, "invalid_policy", str(exc), **exc.details()) from exc
    return {"status": "applied", "policy": policy.model_dump(), "version": controller.policy_version}


@router.post("/baseline")
async def baseline(request: Request, body: BaselineRequest) -> dict[str, Any]:
    controller = _controller(request)
    controller.set_baseline(body.enable)
    return {"baseline_mode": controller.baseline}


@router.get("/config")
async def get_config(request: Request) -> dict[str, Any]:
    controller = _controller(request)
    return {**controller.config.to_document(), "source": str(controller.config_path) if controller.config_path
            else None, "layers": list(controller.sources.layer_sources),
            "restart_required": controller.restart_required, "last_error": controller.config_error}


@router.post("/config")
async def set_config(request: Request) -> dict[str, Any]:
    """Body: ``{"reload": true}`` re-reads the config file; a YAML/TOML/JSON document replaces the config."""
    controller = _controller(request)
    content_type = request.headers.get("content-type", "")
    try:
        if "json" in content_type:
            data = await json_object(request, "config: {\"reload\": true} or a config document "
                                     "({\"infer_os\": {...}})")
            if data.get("reload") is True:
                config = controller.reload_config()
                return {"status": "reloaded", **config.to_document()}
            config = parse_config(yaml.safe_dump(data), "request body")
        else:
            fmt = "toml" if "toml" in content_type else "yaml"
            raw = await request.body()
            config = await asyncio.to_thread(parse_config, _utf8(raw, fmt), "request body", fmt)
        controller.apply_config(config, "POST /v1/config")
    except ConfigSyntaxError as exc:
        raise APIError(400, f"invalid_{exc.fmt}", str(exc), **exc.details()) from exc
    except ConfigError as exc:
        raise APIError(400, "invalid_config", str(exc), **exc.details()) from exc
    return {"status": "applied", **config.to_document()}


@router.post("/evaluate")
async def evaluate(request: Request, body: EvaluateRequest = Body(default_factory=EvaluateRequest)) -> dict[str, Any]:
    """Schedule a full ``inferos eval ppl`` of the active plan: ``{"context": 512, "delay_s": 0}``."""
    controller = _controller(request)
    try:
        return controller.schedule_full_evaluation(body.context, body.delay_s)
    except RuntimeError as exc:
        raise APIError(409, "not_ready", str(exc)) from exc


@router.post("/stats")
async def stats(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """A server's InferenceStats (a server started with ``INFEROS_AGENT_URL`` sends each request's here)."""
    controller = _controller(request)
    try:
        record = STATS_ADAPTER.validate_python({k: v for k, v in body.items() if k != "server_id"})
    except ValidationError as exc:
        raise _validation_error(exc, "invalid_stats") from exc
    controller.record(record)
    controller.note_server(str(body.get("server_id") or "unknown"))
    return {"status": "recorded", "requests": controller.recorder.totals.requests}


@router.get("/history")
async def history(request: Request, limit: int = 100, kind: str | None = None, events: bool = False) -> dict[str, Any]:
    """The last ``limit`` entries: metric snapshots and events; ``kind`` one kind only, ``events=true`` every
    kind but the snapshots (policy, config, guard, fallback, baseline, notification)."""
    controller = _controller(request)
    if limit < 1 or limit > 10_000:
        raise APIError(400, "invalid_request", "limit must be in 1..10000")
    return {"history": controller.history.entries(limit, kind, exclude_kind="snapshot" if events else None),
            "max_entries": controller.history.max_entries}
