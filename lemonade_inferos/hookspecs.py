"""The hooks a Lemonade-compatible host calls on its plugins (pluggy).

Each function's docstring is the contract; what they pass is in ``hooktypes.py``, and what a plugin may use
of the host, the engine and the run is in ``collaborators.py``. The host calls them from
one place, ``host/generate.py``, in this order for every generate call::

    pre_run(context) -> RunPlan | None                   on the event loop; first plan wins
    run_generation(context, plan, run)                   in a worker thread, around the whole run:
        make_cache(context, plan, engine) -> KVCache     (our engine only) first cache wins
        engine.generate(...)                             tokens stream out as they come
    post_run(context, plan, stats, cache)                always, also after an error or a client gone

and, from ``host/models.py``, ``load_session(model_name)`` when a model is loaded (its engine is built then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lemonade_inferos.collaborators import CacheEngine, HostServices, RunHandle
    from lemonade_inferos.engine.kv import KVCache
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.hooktypes import InferenceContext, InferenceStats, RunPlan

PROJECT = "lemonade_server"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def host_startup(host: HostServices) -> None:
    """The host has loaded its plugins and is about to serve. Start background services here."""


@hookspec
def host_shutdown(host: HostServices) -> None:
    """The host is stopping. Stop background services and persist state."""


@hookspec(firstresult=True)
def load_session(model_name: str) -> SessionPolicy | None:
    """The ONNX Runtime session policy the requests of ``model_name`` will run under, asked when the host loads it.

    The host builds that engine before the load returns, as Lemonade's load returns once its backend can answer,
    so the first request does not pay for it. The first policy returned wins; None: the host's plain engine.
    """


@hookspec(firstresult=True)
def pre_run(context: InferenceContext) -> RunPlan | None:
    """PreRun: before every generate call, return a ``RunPlan`` (or None to pass).

    The first plugin that returns a plan wins; with no plan the host runs its plain engine (the baseline).
    """


@hookspec(firstresult=True)
def make_cache(context: InferenceContext, plan: RunPlan, engine: CacheEngine) -> KVCache | None:
    """The KV cache our engine runs this request in (e.g. one already holding a cached prefix of the prompt).

    Called in the worker thread, inside ``run_generation``; the first cache returned wins; with none the host
    uses ``engine.new_cache()``. Not called for baseline runs (og.Generator keeps its own cache).
    """


@hookspec
def run_generation(context: InferenceContext, plan: RunPlan, run: RunHandle) -> None:
    """The run itself, in a worker thread: the host's own implementation builds the cache and drives the engine.

    Plugins implement this only as a wrapper (``@hookimpl(wrapper=True)``, code before and after a ``yield``)
    to bracket what must span the run (e.g. marking the server busy); returning a value is not theirs to do.
    """


@hookspec
def post_run(context: InferenceContext, plan: RunPlan | None, stats: InferenceStats, cache: KVCache | None) -> None:
    """PostRun: after every generate call (also a failed one, with ``stats.error`` and ``stats.error_kind``).

    ``cache`` is the KV cache the request used (None in baseline mode), to keep for reuse.
    """


@hookspec
def extra_routes(app: FastAPI) -> None:
    """Add HTTP routes to the host's app (under a path of the plugin's own)."""
