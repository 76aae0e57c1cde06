"""Loaded models: which are in memory, their engines, and the queue in front of each.

Each loaded model serves up to ``parallel`` generations at once (llama-server's
slots), their steps taking turns at ONNX Runtime (``engine/step_turns.py``: on a
2-core CPU two steps at once only slow each other down), behind a bounded queue:
at most ``max_queue`` requests wait; the next gets HTTP 503 ``server_busy``.
Engines are created lazily: ours (``inferos``) when a plugin's plan asks for it,
og.Generator (``og``) for baseline runs; both take the model's turns.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from lemonade_inferos.engine import heap
from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.engine.og_engine import OgEngine
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.step_turns import StepTurns
from lemonade_inferos.errors import RequestError
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.host.recipe_options import RecipeOptionsStore, resolve_ctx
from lemonade_inferos.host.registry import ROUTER_RECIPE, ModelRegistry, devices_for_recipe
from lemonade_inferos.host.settings import HostSettings

log = logging.getLogger(__name__)


class RequestGate:
    """At most ``parallel`` generations of a model at a time (their steps take turns at ONNX Runtime:
    ``engine/step_turns.py``), at most ``max_queue`` waiting for a place, admitted first come first served or, with
    ``order="shortest_first"``, shortest prompt first.

    A request takes its place in the queue with :meth:`admit` while its route still runs, so a full queue
    is a plain HTTP 503 even for a streamed request (whose response would otherwise have begun).
    """

    def __init__(self, max_queue: int, parallel: int = 1, order: str = "fcfs") -> None:
        self.max_queue, self.parallel, self.order = max_queue, parallel, order
        self.waiting = 0       # admitted, not yet running
        self.running = 0
        self._queue: list[tuple[int, int, asyncio.Future]] = []   # (priority, arrival, wake-up) heap
        self._arrivals = itertools.count()

    @property
    def busy(self) -> bool:
        return self.running > 0

    def admit(self, prompt_tokens: int = 0) -> "Ticket":
        if self.waiting >= self.max_queue:
            raise APIError(503, "server_busy", f"{self.waiting} requests are already waiting for this model; "
                           "retry later", queue=self.waiting)
        self.waiting += 1
        return Ticket(self, prompt_tokens if self.order == "shortest_first" else 0)

    async def _enter(self, priority: int) -> None:
        if self.running < self.parallel and not self._queue:
            self.running += 1
            return
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._arrivals), woken))
        try:
            await woken
        except asyncio.CancelledError:
            if woken.done() and not woken.cancelled():   # woken, then cancelled before it ran: the place goes on
                self._leave()
            raise

    def _leave(self) -> None:
        self.running -= 1
        while self._queue and self.running < self.parallel:
            _, _, woken = heapq.heappop(self._queue)
            if not woken.done():   # a waiter that gave up has a cancelled future
                self.running += 1
                woken.set_result(None)


class Ticket:
    """A place in a gate's queue: :meth:`slot` waits for a running place; :meth:`release` gives an unused queue
    place back."""

    def __init__(self, gate: RequestGate, priority: int = 0) -> None:
        self.gate, self.priority = gate, priority
        self._waiting = True

    def release(self) -> None:
        if self._waiting:
            self._waiting = False
            self.gate.waiting -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        gate = self.gate
        try:
            await gate._enter(self.priority)
        finally:
            self.release()
        try:
            yield
        finally:
            gate._leave()


@dataclass
class LoadedModel:
    name: str
    info: dict[str, Any]
    folder: Path
    ctx_size: int
    devices: list[str]
    fallback_reason: str | None
    gate: RequestGate
    model_ctx: int = 0                # the longest context the model supports
    pinned: bool = False              # pinned models are never unloaded to make room
    last_use: float = field(default_factory=time.time)
    streams: int = 0                  # streamed replies that have sent their first chunk and not ended
    spec: Any = None                  # the parsed folder (engines share it: its fingerprint is read once)
    turns: StepTurns = field(default_factory=StepTurns)   # its running sequences' steps, one at a time
    _engines: dict[str, Any] = field(default_factory=dict)
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def engine(self, kind: str, session: SessionPolicy | None = None) -> Any:
        """The ``inferos`` or ``og`` engine, created on first use (or when the session policy changes). The
        model's sequences ask for it from their own threads: one builds it, the others wait for that one."""
        policy = session or SessionPolicy(devices=self.devices)
        key = kind if kind == "og" else f"inferos:{policy.model_dump_json()}"
        with self._building:
            return self._engine(kind, key, policy)

    def _engine(self, kind: str, key: str, policy: SessionPolicy) -> Any:
        if key not in self._engines:
            if kind == "og":
                self._engines[key] = OgEngine(self.spec or self.folder, context_length=self.ctx_size,
                                              turns=self.turns)
            else:
                for old in [k for k in self._engines if k.startswith("inferos:")]:
                    del self._engines[old]  # one ORT session per model: a new policy replaces the old one
                heap.trim()  # before the new session allocates: what the old one held is reused or returned
                self._engines[key] = OrtEngine(self.spec or self.folder, policy, context_length=self.ctx_size,
                                               background_calibration=True, turns=self.turns)
                heap.trim()  # and after: building a session frees transients that would sit between live blocks
        self.last_use = time.time()
        return self._engines[key]

    def discard_engine(self, kind: str) -> None:
        """Drop the ``inferos`` or ``og`` engine (a stalled one): the next request that needs it builds it anew."""
        prefix = "inferos:" if kind == "inferos" else "og"
        with self._building:
            for key in [k for k in self._engines if k.startswith(prefix)]:
                del self._engines[key]
        heap.trim()
        log.warning("%s: the %s engine was discarded after a stalled generation", self.name, kind)

    @property
    def tokenizer(self):
        from lemonade_inferos.engine.tokenizer import ChatTokenizer
        if "tokenizer" not in self._engines:
            self._engines["tokenizer"] = ChatTokenizer.from_folder(self.folder)
        return self._engines["tokenizer"]

    def health_entry(self) -> dict[str, Any]:
        """Lemonade's health entry of a loaded model. ``pid`` is a backend process in Lemonade's contract, one a
        client may signal (its watchdog and pinning tests SIGKILL it): the model runs inside this server, so there
        is none, and naming the server's own pid would let such a client take the whole API down."""
        return {"model_name": self.name, "checkpoint": self.info.get("checkpoint"), "last_use": self.last_use,
                "type": "llm", "device": " ".join(d for d in self.devices if d != "cpu") or "cpu",
                "recipe": self.info.get("recipe", "oga-cpu"), "pinned": self.pinned, "is_busy": self.gate.busy,
                "is_streaming": self.streams > 0, "pid": None, "backend_url": None,
                "recipe_options": {"ctx_size": self.ctx_size}, "max_context_window": self.model_ctx,
                "inferos": {"folder": str(self.folder), "fallback_reason": self.fallback_reason,
                            "live_kv": self._live_kv(), "scheduler": self.scheduler_report()}}

    def scheduler_report(self) -> dict[str, Any]:
        """The effective scheduling knobs and what they did: places, who runs and waits, the steps' turns."""
        gate = self.gate
        return {"parallel": gate.parallel, "order": gate.order, "running": gate.running, "waiting": gate.waiting,
                **self.turns.report()}

    def _live_kv(self) -> dict[str, Any] | None:
        """The live KV form of our engine for this model (INT8 or the model's dtype, and why), once it is loaded."""
        engine = next((e for k, e in self._engines.items() if k.startswith("inferos:")), None)
        return engine.live_kv_report() if engine is not None else None


class ModelManager:
    def __init__(self, registry: ModelRegistry, settings: HostSettings,
                 session_for: Callable[[str], SessionPolicy | None] | None = None) -> None:
        """``session_for``: the session policy a model's requests will run under (None: the plain og engine);
        given, a load builds that engine before it returns."""
        self.registry = registry
        self.settings = settings
        self.session_for = session_for
        self.loaded: dict[str, LoadedModel] = {}
        self.loading: dict[str, float] = {}    # name -> when its load began
        self.current: str | None = None
        self.options = RecipeOptionsStore(registry.user_models_path.with_name("recipe_options.json"))
        self._lock = asyncio.Lock()

    async def load(self, name: str, ctx_size: int | None = None, build_missing: bool = True,
                   save_options: bool = False, pinned: bool | None = None) -> LoadedModel:
        """Load ``name`` (building a built-in model on first use), unloading the least recently used unpinned
        model if full. Its context length: ``ctx_size`` > the saved recipe options > ``--ctx-size`` > the model's
        own (``-1``: the model's own). Loading a loaded model again without options, or with options that resolve
        to what it runs with, changes nothing."""
        name = self.registry.canonical(name)
        async with self._lock:
            info = self.registry.get(name)
            if info.get("recipe") == ROUTER_RECIPE:
                raise RequestError(f"'{name}' is a router collection: it is not loaded itself, its requests run on "
                                   f"the candidate its policy picks; load those: {info.get('components')}",
                                   model=name)
            if save_options and ctx_size is not None:
                self.options.save(name, info.get("recipe", "oga-cpu"), {"ctx_size": ctx_size})
            loaded = self.loaded.get(name)
            if loaded is not None and (ctx_size is None or resolve_ctx(ctx_size, {}, None, loaded.model_ctx)
                                       == loaded.ctx_size):
                loaded.pinned = loaded.pinned if pinned is None else pinned
                self.current = name
                return loaded
            self.loading[name] = time.time()
            try:
                model = await self._load(name, info, ctx_size, build_missing, pinned)
            finally:
                del self.loading[name]
            self.loaded[name] = model
            self.current = name
            return model

    async def _load(self, name: str, info: dict[str, Any], ctx_size: int | None, build_missing: bool,
                    pinned: bool | None) -> LoadedModel:
        """Build the folder if it is missing, make room, and build the engine the model's requests will run on
        before it counts as loaded: Lemonade's load returns once its backend answers, and the first request does
        not pay for sessions and prepacking. Meanwhile ``/api/v1/health`` lists the model as loading."""
        if build_missing and not self.registry.is_ready(name):
            log.info("building %s on first use", name)
            await asyncio.to_thread(self.registry.pull, name, progress=lambda msg: log.info("%s", msg))
        folder = self.registry.folder(name)
        spec = await asyncio.to_thread(load_model_folder, folder)
        ctx = resolve_ctx(ctx_size, self.options.saved(name), self.settings.ctx_size, spec.context_length)
        devices, reason = devices_for_recipe(info.get("recipe", "oga-cpu"))
        self.loaded.pop(name, None)
        self._make_room(name)
        settings = self.settings
        model = LoadedModel(name, info, folder, ctx, devices, reason,
                            RequestGate(settings.max_queue, settings.parallel, settings.schedule),
                            model_ctx=spec.context_length, pinned=bool(pinned), spec=spec,
                            turns=StepTurns(settings.prefill_chunk_budget, settings.batch_decode))
        if self.session_for is not None:
            await asyncio.to_thread(self._build_engine, model)
        return model

    def _build_engine(self, model: LoadedModel) -> None:
        started = time.perf_counter()
        session = self.session_for(model.name)
        model.engine("og" if session is None else "inferos", session)
        log.info("%s: engine ready in %.1f s", model.name, time.perf_counter() - started)

    def health_entries(self) -> list[dict[str, Any]]:
        """Loaded models (``status: ready``) and those still being built or loaded (``status: loading``)."""
        ready = [{**m.health_entry(), "status": "ready"} for m in self.loaded.values()]
        return ready + [{"model_name": name, "status": "loading", "loading_since": since, "type": "llm"}
                        for name, since in self.loading.items()]

    def _make_room(self, name: str) -> None:
        while len(self.loaded) >= self.settings.max_loaded_models:
            unpinned = [m for m in self.loaded.values() if not m.pinned]
            if not unpinned:
                raise APIError(409, "slots_pinned_error", f"cannot load {name}: every loaded model is pinned and "
                               f"max_loaded_models is {self.settings.max_loaded_models}; unload one first",
                               pinned=sorted(self.loaded))
            oldest = min(unpinned, key=lambda m: m.last_use)
            log.info("unloading %s to make room for %s", oldest.name, name)
            del self.loaded[oldest.name]
            heap.trim()

    async def unload(self, name: str | None = None) -> list[str]:
        async with self._lock:
            names = [name] if name else list(self.loaded)
            for n in names:
                if n not in self.loaded:
                    raise APIError(404, "model_not_loaded", f"model '{n}' is not loaded",
                                   loaded=list(self.loaded))
                del self.loaded[n]
            if self.current not in self.loaded:
                self.current = next(iter(self.loaded), None)
            await asyncio.to_thread(heap.trim)
            return names

    async def resolve(self, name: str | None) -> LoadedModel:
        """The model a request names (loading it), or the current one, or the default model."""
        name = self.registry.canonical(name or self.current or self.settings.default_model)
        model = self.loaded.get(name) or await self.load(name)
        self.current = name
        return model
