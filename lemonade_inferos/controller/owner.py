"""What the controller asks of the plugin that owns it: one small typed protocol instead of six callbacks.

The controller owns the policy and what is measured about it; the plugin owns the caches and the engines. The
few things the controller needs from that side (their numbers, a full evaluation on a loaded engine, whether a
request runs) and tells it (a quality guard step, reloaded settings) are this protocol's methods. A controller
without an owner (tests, tools, a sidecar agent) has none of these: no caches to report, no engine to evaluate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lemonade_inferos.config.settings import InferosSettings
    from lemonade_inferos.kvcache.reuse_stats import ReuseStats
    from lemonade_inferos.metrics.snapshot import KVMemory


class ControllerOwner(Protocol):
    def prefix_stats(self) -> ReuseStats | None:
        """The prefix store's and the warm caches' numbers."""

    def kv_memory(self) -> KVMemory | None:
        """KV bytes live and at rest, measured now."""

    def full_evaluation(self, context: int) -> dict[str, Any]:
        """``inferos eval ppl`` of the active plan on the engine that served the last request."""

    def guard_stepped(self, event: dict[str, Any]) -> None:
        """Told of each quality guard transition, before anyone else (a step back drops what it no longer allows)."""

    def settings_changed(self, old: InferosSettings, new: InferosSettings) -> None:
        """Told of reloaded settings, to apply what the owner holds (budgets, counts, the log level)."""

    def busy(self) -> bool:
        """Whether a request runs now (the loops slow down while none does)."""
