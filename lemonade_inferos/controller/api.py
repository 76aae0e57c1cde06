"""The Infer-OS control API (127.0.0.1 only): health, metrics, policy, baseline, config, history.

Reads are open; every POST needs ``X-Inferos-Token``. Errors use
``{"error": {"code", "message", "details"}}``; responses carry the design
document's security headers; CORS admits loopback origins only.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from lemonade_inferos import __version__
from lemonade_inferos.controller.auth import make_token_check
from lemonade_inferos.controller.config import ConfigError, parse_config
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.host.errors import APIError, install_error_handlers
from lemonade_inferos.metrics.prometheus import ControllerCollector

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "X-XSS-Protection": "1; mode=block", "Cache-Control": "no-store"}
LOOPBACK_ORIGINS = r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$"


class BaselineRequest(BaseModel):
    enable: bool


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    field = ".".join(map(str, first["loc"]))
    return APIError(400, "invalid_policy", f"{field}: {first['msg']}",
                    errors=[{"loc": list(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()])


def create_control_app(controller: Controller, token: str) -> FastAPI:
    app = FastAPI(title="Infer-OS Control Agent", version=__version__)
    install_error_handlers(app)
    app.add_middleware(CORSMiddleware, allow_origin_regex=LOOPBACK_ORIGINS, allow_methods=["GET", "POST"],
                       allow_headers=["X-Inferos-Token", "Content-Type"])

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    registry = CollectorRegistry()
    registry.register(ControllerCollector(controller.metrics))
    router = APIRouter(prefix="/v1")
    auth = [Depends(make_token_check(token))]

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "timestamp": datetime.now(timezone.utc).isoformat(), "version": __version__,
                "policy_version": controller.policy_version, "baseline_mode": controller.use_baseline,
                "guard_level": controller.guard.level}

    @router.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return controller.metrics()

    @router.get("/metrics/prometheus")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/policy")
    async def get_policy() -> dict[str, Any]:
        return {"policy": controller.policy.model_dump(), "version": controller.policy_version}

    @router.post("/policy", dependencies=auth)
    async def set_policy(update: dict[str, Any] = Body(...)) -> dict[str, Any]:
        try:
            policy = controller.update_policy(update)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        return {"status": "applied", "policy": policy.model_dump(), "version": controller.policy_version}

    @router.post("/baseline", dependencies=auth)
    async def baseline(body: BaselineRequest) -> dict[str, Any]:
        controller.set_baseline(body.enable)
        return {"baseline_mode": controller.baseline}

    @router.get("/config")
    async def get_config() -> dict[str, Any]:
        return {**controller.config.to_document(), "source": str(controller.config_path) if controller.config_path
                else None, "last_error": controller.config_error}

    @router.post("/config", dependencies=auth)
    async def set_config(request: Request) -> dict[str, Any]:
        """Body: ``{"reload": true}`` re-reads the config file; a YAML/TOML/JSON document replaces the config."""
        raw = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            if "json" in content_type:
                import json
                data = json.loads(raw or b"{}")
                if data.get("reload"):
                    config = controller.reload_config()
                    return {"status": "reloaded", **config.to_document()}
                import yaml
                config = parse_config(yaml.safe_dump(data), "request body")
            else:
                config = parse_config(raw.decode(), "request body", "toml" if "toml" in content_type else "yaml")
        except ConfigError as exc:
            raise APIError(400, "invalid_config", str(exc), **exc.details()) from exc
        except ValueError as exc:
            raise APIError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
        controller.apply_config(config, "POST /v1/config")
        return {"status": "applied", **config.to_document()}

    @router.post("/evaluate", dependencies=auth)
    async def evaluate(body: dict[str, Any] = Body(default={})) -> dict[str, Any]:
        """Schedule a full ``inferos eval ppl`` of the active plan: ``{"context": 512, "delay_s": 0}``."""
        context, delay = int(body.get("context", 512)), float(body.get("delay_s", 0))
        if not 64 <= context <= 8192 or delay < 0:
            raise APIError(400, "invalid_request", "context must be in 64..8192 and delay_s >= 0")
        try:
            return controller.schedule_full_evaluation(context, delay)
        except RuntimeError as exc:
            raise APIError(409, "not_ready", str(exc)) from exc

    @router.get("/history")
    async def history(limit: int = 100, kind: str | None = None) -> dict[str, Any]:
        if limit < 1 or limit > 10_000:
            raise APIError(400, "invalid_request", "limit must be in 1..10000")
        return {"history": controller.history.entries(limit, kind), "max_entries": controller.history.max_entries}

    app.include_router(router)
    return app
