"""The app factory: one FastAPI app serving Lemonade's API under /api/v1, /api/v0, /v1 and /v0."""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lemonade_inferos import __version__
from lemonade_inferos.host.errors import APIError, install_error_handlers
from lemonade_inferos.host.generate import GenerateService, HostStats
from lemonade_inferos.host.models import ModelManager
from lemonade_inferos.host.registry import ModelRegistry
from lemonade_inferos.host.routes import LEMONADE_API_VERSION, router
from lemonade_inferos.host.settings import HostSettings
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
    default_params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # what plugins publish in /health under "inferos"


class HostCollector:
    """Host counters for Prometheus, built from HostStats on each scrape."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self):
        stats = self.host.host_stats
        up = GaugeMetricFamily("lemonade_server_up", "Whether the Lemonade server is running.")
        up.add_metric([], 1)
        info = GaugeMetricFamily("lemonade_server_info", "Server build information.", labels=["version", "inferos"])
        info.add_metric([LEMONADE_API_VERSION, __version__], 1)
        yield up
        yield info
        for name, value, doc in (("requests", stats.request_count_total, "Generate calls served."),
                                 ("prompt_tokens", stats.prompt_tokens_total, "Prompt tokens, cached included."),
                                 ("cache_tokens", stats.cache_tokens_total, "Prompt tokens served from the KV cache."),
                                 ("completion_tokens", stats.output_tokens_total, "Tokens generated."),
                                 ("request_errors", stats.errors_total, "Generate calls that failed.")):
            counter = CounterMetricFamily(f"inferos_{name}", doc)
            counter.add_metric([], value)
            yield counter
        if stats.last is not None:
            last = stats.last
            for name, value, doc in (("last_time_to_first_token_seconds", last.ttft_s, "TTFT of the last request."),
                                     ("last_decode_tokens_per_second", last.predicted_per_second,
                                      "Decode speed of the last request.")):
                if value is not None:
                    gauge = GaugeMetricFamily(f"inferos_{name}", doc)
                    gauge.add_metric([], value)
                    yield gauge


def make_auth(api_key: str | None):
    """A dependency that requires ``Authorization: Bearer <LEMONADE_API_KEY>`` when a key is set."""

    async def require_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")

    return require_key


def create_app(settings: HostSettings, pm: pluggy.PluginManager | None = None,
               manifests: dict[str, PluginManifest] | None = None, preload: bool = True) -> FastAPI:
    """Build the host app. Plugins must already be registered on ``pm`` (see ``plugins.load_plugins``)."""
    pm = pm or new_plugin_manager()
    registry = ModelRegistry()
    models = ModelManager(registry, settings)
    host_stats = HostStats()
    host = Host(settings, pm, manifests or {}, registry, models, host_stats, GenerateService(pm, models, host_stats),
                CollectorRegistry())
    host.prometheus_registry.register(HostCollector(host))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pm.hook.host_startup(host=host)
        if preload:
            await models.load(settings.default_model)
        log.info("serving on http://%s:%s (plugins: %s)", settings.host, settings.port,
                 ", ".join(host.manifests) or "none, baseline mode")
        try:
            yield
        finally:
            pm.hook.host_shutdown(host=host)

    app = FastAPI(title="lemonade-server (inferos host)", version=LEMONADE_API_VERSION, lifespan=lifespan)
    app.state.host = host
    install_error_handlers(app)
    auth = [Depends(make_auth(settings.api_key))]
    for prefix in API_PREFIXES:
        app.include_router(router, prefix=prefix, dependencies=auth)

    @app.get("/live")
    async def live():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(generate_latest(host.prometheus_registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    pm.hook.extra_routes(app=app)
    return app
