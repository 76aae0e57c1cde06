"""The app factory: one FastAPI app serving Lemonade's API under /api/v1, /api/v0, /v1 and /v0."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest

from lemonade_inferos import __version__
from lemonade_inferos.http.handlers import install_error_handlers
from lemonade_inferos.host.serving import invalid_body
from lemonade_inferos.host.anthropic import router as anthropic_router
from lemonade_inferos.host.generate import GenerateService
from lemonade_inferos.host.models import ModelManager
from lemonade_inferos.host.ollama import router as ollama_router
from lemonade_inferos.host.registry import ModelRegistry
from lemonade_inferos.host.internal import router as internal_router
from lemonade_inferos.host.llamacpp import router as llamacpp_router
from lemonade_inferos.host.model_routes import router as model_router
from lemonade_inferos.host.routes import LEMONADE_API_VERSION, router
from lemonade_inferos.host.route_dispatch import RouteHeader
from lemonade_inferos.host.routing import router as routing_router
from lemonade_inferos.host.run import HostRunner
from lemonade_inferos.host.settings import HostSettings
from lemonade_inferos.host.telemetry import Telemetry
from lemonade_inferos.http.body_limit import BodyLimit
from lemonade_inferos.http.errors import document_errors_as_400
from lemonade_inferos.http.guard import RequestGuard, TokenRule, guard_policy_from_env
from lemonade_inferos.metrics.host import HostCollector, HostStats
from lemonade_inferos.plugins import PluginManifest, new_plugin_manager

log = logging.getLogger(__name__)
API_PREFIXES = ("/api/v1", "/api/v0", "/v1", "/v0")


@dataclass
class Host:
    """Everything the routes and the plugins reach: settings, models, the generate service, stats."""

    settings: HostSettings
    pm: pluggy.PluginManager
    manifests: dict[str, PluginManifest]
    registry: ModelRegistry
    models: ModelManager
    host_stats: HostStats
    generator: GenerateService
    prometheus_registry: CollectorRegistry
    telemetry: Telemetry
    default_params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # what plugins publish in /health under "inferos"
    # what plugins measure on demand for /stats under "inferos" (name -> a function returning a JSON object)
    stat_sources: dict[str, Callable[[], Any]] = field(default_factory=dict)

    # -- what plugins may use (collaborators.HostServices) ------------------------------------------------
    def register_collector(self, collector: Any) -> None:
        self.prometheus_registry.register(collector)

    def add_stat_source(self, name: str, source: Callable[[], dict[str, Any]]) -> None:
        self.stat_sources[name] = source

    def set_health_extra(self, name: str, value: Any) -> None:
        self.extras[name] = value

    @property
    def active_plugins(self) -> list[str]:
        """Registered plugins (a plugin that disabled itself has a manifest but no hooks)."""
        return sorted(name for name, manifest in self.manifests.items() if manifest.disabled is None)


def api_key_rule(api_key: str | None) -> TokenRule | None:
    """``LEMONADE_API_KEY``: every route but ``/live`` needs ``Authorization: Bearer <key>`` (or, as Lemonade
    takes from Anthropic's clients, ``X-Api-Key: <key>``)."""
    if not api_key:
        return None
    return TokenRule(api_key, "authorization", needs=lambda method, path: path != "/live", scheme="Bearer",
                     message="missing or wrong API key: send 'Authorization: Bearer <key>'", also=("x-api-key",))


def _loaded_models(models: ModelManager) -> tuple[list[dict[str, Any]], int]:
    loaded = [{"name": m.name, "recipe": m.info.get("recipe", "oga-cpu"), "ctx_size": m.ctx_size,
               "device": m.health_entry()["device"]} for m in models.loaded.values()]
    return loaded, models.settings.max_loaded_models


def create_app(settings: HostSettings, pm: pluggy.PluginManager | None = None,
               manifests: dict[str, PluginManifest] | None = None, preload: bool = True) -> FastAPI:
    """Build the host app. Plugins must already be registered on ``pm`` (see ``plugins.load_plugins``)."""
    pm = pm or new_plugin_manager()
    registry = ModelRegistry(extra_models_dir=settings.extra_models_dir)
    models = ModelManager(registry, settings, session_for=lambda name: pm.hook.load_session(model_name=name))
    host_stats = HostStats()
    telemetry = Telemetry(__version__)
    host = Host(settings, pm, manifests or {}, registry, models, host_stats,
                GenerateService(pm, models, host_stats, settings.request_timeout_s, telemetry), CollectorRegistry(),
                telemetry)
    host.prometheus_registry.register(HostCollector(host_stats, LEMONADE_API_VERSION, __version__,
                                                    loaded=lambda: _loaded_models(models),
                                                    telemetry=lambda: dict(telemetry.counts)))
    pm.register(HostRunner(pm), name="host")  # the run itself; plugins wrap it

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pm.hook.host_startup(host=host)
        if preload:
            await models.load(settings.default_model)
        log.info("host ready (plugins: %s)", ", ".join(host.active_plugins) or "none, baseline mode")
        try:
            yield
        finally:
            host.generator.stop()
            pm.hook.host_shutdown(host=host)
            telemetry.shutdown()

    app = FastAPI(title="lemonade-server (inferos host)", version=LEMONADE_API_VERSION, lifespan=lifespan)
    app.state.host = host
    install_error_handlers(app, on_invalid_body=invalid_body)
    document_errors_as_400(app)
    for prefix in API_PREFIXES:
        app.include_router(router, prefix=prefix)
        app.include_router(model_router, prefix=prefix)
        app.include_router(routing_router, prefix=prefix)   # /routing/validate
        app.include_router(llamacpp_router, prefix=prefix)   # /tokenize, /detokenize
        app.include_router(anthropic_router, prefix=prefix)  # /messages, /messages/count_tokens
    app.include_router(anthropic_router, prefix="/api")      # Lemonade's /api/messages alias
    app.include_router(ollama_router)   # Ollama's /api/chat, /api/generate, /api/tags, /api/ps, /api/version

    @app.get("/live")
    async def live():
        return {"status": "ok"}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return PlainTextResponse(generate_latest(host.prometheus_registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(internal_router)  # /internal/set, /internal/config, /internal/telemetry/flush

    pm.hook.extra_routes(app=app)
    app.add_middleware(RouteHeader)   # innermost: it reads the decision the route left in the request's scope
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, setting="--max-body-mb or LEMONADE_MAX_BODY_MB")
    app.add_middleware(RequestGuard, policy=guard_policy_from_env(os.environ, api_key_rule(settings.api_key),
                                                                  bind_host=settings.host))
    return app
