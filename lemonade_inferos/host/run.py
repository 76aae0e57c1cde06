"""One generation attempt, run in a worker thread while the event loop streams it.

The worker (the ``run_generation`` hook, which plugins may wrap) builds the cache and drives the engine,
handing every chunk to the loop through ``emit``; the loop decides when the run must end early (client gone,
time limit, shutdown: :class:`RunLimits`) and asks the worker to stop, which it does between two tokens, so
the cache always ends consistent. Errors are sorted into kinds (:func:`error_kind`); only the engine's own
``fault`` is held against it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import GenerationStalled, RequestError, RequestTimeout, ServerStopping
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.http.errors import APIError

DISCONNECT_POLL_S = 0.25  # how often a non-streaming run asks whether its client is still there


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away: its generation stops."""


def error_kind(exc: BaseException) -> str:
    """``request``, ``cancelled``, ``shutdown``, ``stalled``, ``timeout`` or ``fault``."""
    if isinstance(exc, (asyncio.CancelledError, ClientDisconnected, GeneratorExit)):
        return "cancelled"
    if isinstance(exc, ServerStopping):
        return "shutdown"
    if isinstance(exc, GenerationStalled):
        return "stalled"
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, RequestError) or (isinstance(exc, APIError) and exc.status < 500):
        return "request"
    return "fault"


@dataclass
class RunLimits:
    """When a run must end early: its time limit, its client gone (non-streaming), the server stopping."""

    timeout_s: float
    stopping: threading.Event
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    started: float = field(default_factory=time.monotonic)
    _next_poll: float = 0.0

    async def check(self, stats: GenerationStats) -> None:
        now = time.monotonic()
        if self.stopping.is_set():
            raise ServerStopping("the server is shutting down; this generation was ended",
                                 completion_tokens=stats.predicted_n)
        if now - self.started > self.timeout_s:
            raise RequestTimeout(f"the generation ran past the request time limit of {self.timeout_s:g} s "
                                 f"(--request-timeout) after {stats.predicted_n} tokens; ask for fewer tokens",
                                 limit_s=self.timeout_s, completion_tokens=stats.predicted_n)
        if self.is_disconnected is not None and now >= self._next_poll:
            self._next_poll = now + DISCONNECT_POLL_S
            if await self.is_disconnected():
                raise ClientDisconnected()


@dataclass
class GenerationRun:
    """One attempt on one engine: what the worker executes and the loop streams.

    ``emit`` is set by the loop before the worker starts; ``cache`` is the cache the attempt ran in (None for
    the baseline engine), for PostRun. ``stats`` starts when the run is made: TTFT includes building the cache
    (a restore is part of it).
    """

    engine: Any
    baseline: bool
    prompt_ids: Sequence[int]
    params: SamplingParams
    run_options: dict[str, str]
    speculation: Any = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    cache: Any = None
    emit: Callable[[GenerationChunk], None] = lambda chunk: None
    _stop: threading.Event = field(default_factory=threading.Event)
    _ort_options: Any = None

    def __post_init__(self) -> None:
        if not self.baseline:  # one RunOptions for the whole run: terminate() reaches the step in flight
            from lemonade_inferos.engine.session import make_run_options

            self._ort_options = make_run_options(self.run_options, always=True)

    def stop(self) -> None:
        self._stop.set()

    def terminate(self) -> None:
        """Stop now, also inside a step: ONNX Runtime ends the run in flight (the watchdog's last resort)."""
        self._stop.set()
        if self._ort_options is not None:
            self._ort_options.terminate = True

    def execute(self, cache: Any) -> None:
        """Drive the engine until it finishes or :meth:`stop` is called (checked between tokens)."""
        self.cache = cache
        kwargs = {} if self.baseline else {"cache": cache, "run_options": self._ort_options,
                                           "speculation": self.speculation}
        iterator = self.engine.generate(self.prompt_ids, self.params, stats=self.stats, **kwargs)
        try:
            for chunk in iterator:
                self.emit(chunk)
                if self._stop.is_set():
                    break
        finally:
            iterator.close()


class HostRunner:
    """The host's own ``run_generation``: the cache from ``make_cache`` (or a fresh one), then the engine."""

    def __init__(self, pm: Any) -> None:
        self.pm = pm

    @hookimpl
    def run_generation(self, context: Any, plan: Any, run: GenerationRun) -> None:
        cache = None
        if not run.baseline:
            cache = self.pm.hook.make_cache(context=context, plan=plan, engine=run.engine) or run.engine.new_cache()
        run.execute(cache)
