"""What a plugin may use of the host and of an engine: the typed collaborators the hooks hand over.

``hookspecs.py`` passes these instead of the host's or the engine's whole object, so a plugin written against
them keeps working when the host's internals move, and what the host promises plugins is written down here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from lemonade_inferos.engine.types import GenerationStats
    from lemonade_inferos.engine.kv import KVCache, KVLayout
    from lemonade_inferos.engine.model_folder import ModelFolder
    from lemonade_inferos.engine.session import SessionPolicy


class HostServices(Protocol):
    """What a plugin may do with the host at start-up and shutdown."""

    def register_collector(self, collector: Collector) -> None:
        """Add Prometheus families to the host's one ``/metrics`` exposition."""

    def add_stat_source(self, name: str, source: Callable[[], dict[str, Any]]) -> None:
        """Report ``source()`` in ``/api/v1/stats`` under ``inferos.<name>``, measured on each read."""

    def set_health_extra(self, name: str, value: Any) -> None:
        """Publish ``value`` in ``/api/v1/health`` under ``inferos.<name>``."""


class CacheEngine(Protocol):
    """What ``make_cache`` may use of the engine that runs the request (ours: ``engine/ort_engine.py``)."""

    folder: ModelFolder
    policy: SessionPolicy
    has_position_ids: bool   # the graph takes true positions (a cache may then re-place KV: segment reuse)
    hybrid: bool             # prefill and decode run under different session options

    def layout_for(self, plan: object) -> KVLayout:
        """The KV layout a cache for ``plan`` must have on this engine (the live form, the model's dtype)."""

    def new_cache(self, layout: KVLayout | None = None) -> KVCache:
        """A fresh cache this engine runs in."""

    def session_report(self) -> dict[str, object]:
        """The session options that were applied, per phase."""

    def live_kv_report(self) -> dict[str, object]:
        """The live KV form and why."""

    def transient_forms(self) -> ContextManager[None]:
        """A scope in which reference forms loaded for scoring are dropped at its end."""


class RunHandle(Protocol):
    """One generation as ``run_generation`` wrappers see it: which engine, and what it measured so far."""

    engine: Any              # our engine (a CacheEngine), or og.Generator's wrapper in baseline mode
    baseline: bool
    stats: GenerationStats

    def stop(self) -> None:
        """End the run between tokens."""
