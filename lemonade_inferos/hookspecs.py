"""The hooks a Lemonade-compatible host calls on its plugins (pluggy).

Each function's docstring is the contract. The host calls them from one place,
``host/generate.py``.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "lemonade_server"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def host_startup(host: Any) -> None:
    """The host has loaded its plugins and is about to serve. Start background services here."""


@hookspec
def host_shutdown(host: Any) -> None:
    """The host is stopping. Stop background services and persist state."""


@hookspec(firstresult=True)
def pre_run(context: Any) -> Any:
    """PreRun: before every generate call, return a ``RunPlan`` (or None to pass).

    The first plugin that returns a plan wins; with no plan the host runs its
    plain engine (the baseline).
    """


@hookspec
def post_run(context: Any, plan: Any, stats: Any, cache: Any) -> None:
    """PostRun: after every generate call (also a failed one, with ``stats.error`` set).

    ``stats`` is the measured :class:`~lemonade_inferos.metrics.stats.InferenceStats`;
    ``cache`` the KV cache the request used (None in baseline mode), to keep for reuse.
    """


@hookspec
def extra_routes(app: Any) -> None:
    """Add HTTP routes to the host's app (under a path of the plugin's own)."""
