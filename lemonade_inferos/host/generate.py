"""The one place the hooks are called: every generate call goes through :meth:`GenerateService.open`.

    ticket = gate.admit()            (in the route, before any response starts: a full queue is a plain 503)
      ticket.slot()                  (queue: one generation per model at a time)
        plan = pre_run(context)      (first plugin to answer wins; None -> baseline og.Generator)
        engine.generate(...)         (in a worker thread; chunks streamed back; between chunks the run ends
                                      early for a client that has gone, the time limit, or shutdown)
        post_run(context, plan, stats, cache)   (always, also on error or client disconnect)

Errors have kinds (:func:`error_kind`): a caller's mistake (``request``), a client gone or a shutdown
(``cancelled``/``shutdown``), the time limit (``timeout``) and the engine's own ``fault``. Only a fault
before the first token is retried on the baseline engine, and only faults count against our engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import pluggy
from starlette.concurrency import iterate_in_threadpool

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import RequestError, RequestTimeout, ServerStopping
from lemonade_inferos.host.context import InferenceContext, RunPlan
from lemonade_inferos.host.models import LoadedModel, ModelManager, Ticket
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.metrics.stats import InferenceStats, stats_from_generation

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming run asks whether its client is still there


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away: its generation stops."""


def error_kind(exc: BaseException) -> str:
    """``request``, ``cancelled``, ``shutdown``, ``timeout`` or ``fault`` (see the module docstring)."""
    if isinstance(exc, (asyncio.CancelledError, ClientDisconnected, GeneratorExit)):
        return "cancelled"
    if isinstance(exc, ServerStopping):
        return "shutdown"
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, RequestError) or (isinstance(exc, APIError) and exc.status < 500):
        return "request"
    return "fault"


@dataclass
class HostStats:
    """What ``/stats`` reports: the last request and totals since start."""

    last: InferenceStats | None = None
    request_count_total: int = 0
    input_tokens_total: int = 0
    output_tokens_total: int = 0
    prompt_tokens_total: int = 0
    cache_tokens_total: int = 0
    errors_total: int = 0        # requests that failed: the caller's mistakes, time limits and faults
    cancelled_total: int = 0     # clients that went away, and runs ended by a shutdown: not errors

    def record(self, stats: InferenceStats) -> None:
        self.last = stats
        self.request_count_total += 1
        self.prompt_tokens_total += stats.prompt_n
        self.cache_tokens_total += stats.cache_n
        self.input_tokens_total += stats.prompt_n - stats.cache_n
        self.output_tokens_total += stats.predicted_n
        self.errors_total += stats.error_kind in ("request", "timeout", "fault")
        self.cancelled_total += stats.error_kind in ("cancelled", "shutdown")


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
class Run:
    """An admitted generation: iterate it for chunks and then the final InferenceStats; ``release`` gives the
    queue place back if it is never iterated (idempotent)."""

    request_id: str
    ticket: Ticket
    items: AsyncIterator[GenerationChunk | InferenceStats]

    def __aiter__(self) -> AsyncIterator[GenerationChunk | InferenceStats]:
        return self.items

    def release(self) -> None:
        self.ticket.release()


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


class GenerateService:
    def __init__(self, pm: pluggy.PluginManager, models: ModelManager, host_stats: HostStats,
                 timeout_s: float = 600.0) -> None:
        self.pm = pm
        self.models = models
        self.host_stats = host_stats
        self.timeout_s = timeout_s
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Shutdown: refuse new runs and end running ones at their next token. Safe from a signal handler."""
        self.stopping.set()

    def open(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, endpoint: str,
             request_id: str | None = None,
             is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Run:
        """Admit a run now (503 ``server_busy`` when the queue is full, 503 while shutting down)."""
        if self.stopping.is_set():
            raise ServerStopping("the server is shutting down; retry on its next start")
        ticket = model.gate.admit()
        limits = RunLimits(self.timeout_s, self.stopping, is_disconnected)
        request_id = request_id or new_request_id()
        return Run(request_id, ticket, self._run(ticket, model, prompt_ids, params, endpoint, request_id, limits))

    async def _run(self, ticket: Ticket, model: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                   endpoint: str, request_id: str, limits: RunLimits
                   ) -> AsyncIterator[GenerationChunk | InferenceStats]:
        """Yield chunks, then one final :class:`InferenceStats` (post_run sees errors too; they are re-raised)."""
        arrived = time.perf_counter()
        try:
            async with ticket.slot():
                queue_s = time.perf_counter() - arrived
                limits.started = time.monotonic()  # the time limit is the generation's, not the queue's
                await limits.check(GenerationStats())
                async for item in self._generate(model, prompt_ids, params, endpoint, request_id, limits, queue_s):
                    yield item
        finally:
            ticket.release()

    async def _generate(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, endpoint: str,
                        request_id: str, limits: RunLimits, queue_s: float
                        ) -> AsyncIterator[GenerationChunk | InferenceStats]:
        context = InferenceContext(request_id=request_id, model=model.name, model_path=str(model.folder),
                                   prompt_ids=prompt_ids, max_tokens=params.max_tokens, endpoint=endpoint,
                                   context_length=model.ctx_size)
        plan: RunPlan | None = self.pm.hook.pre_run(context=context)
        baseline = plan is None or plan.baseline
        # from here on PostRun sees every outcome: a failure to build our engine or its cache included
        engine_name = "og" if baseline else "inferos"
        gen_stats, start_unix = GenerationStats(), time.time()
        cache: Any = None
        iterator: Any = None
        error: BaseException | None = None
        fallback_error: BaseException | None = None
        try:
            try:
                engine = await asyncio.to_thread(model.engine, engine_name, None if baseline else plan.session)
                # TTFT counts from here, as before any engine existed: restoring a cached prefix is part of it
                gen_stats, start_unix = GenerationStats(), time.time()
                if not baseline:
                    make_cache = plan.make_cache or (lambda eng: eng.new_cache())
                    cache = await asyncio.to_thread(make_cache, engine)
                kwargs = {} if baseline else {"cache": cache, "run_options": plan.run_options}
                iterator = engine.generate(prompt_ids, params, stats=gen_stats, **kwargs)
                async for chunk in iterate_in_threadpool(iterator):
                    yield chunk
                    await limits.check(gen_stats)
            except Exception as exc:
                if baseline or gen_stats.predicted_n or error_kind(exc) != "fault":
                    raise
                # our engine's own fault before any token: serve this request on the baseline engine
                log.exception("engine %s failed; serving this request on the baseline engine", engine_name)
                fallback_error = exc
                self._report(context, plan, model, engine_name, gen_stats, start_unix, cache, False, exc, queue_s)
                if iterator is not None:
                    iterator.close()
                engine_name, baseline, cache, plan = ("og", True, None,
                                                      RunPlan(baseline=True, notes={"fallback": repr(exc)}))
                engine = await asyncio.to_thread(model.engine, "og")
                gen_stats, start_unix = GenerationStats(), time.time()
                iterator = engine.generate(prompt_ids, params, stats=gen_stats)
                async for chunk in iterate_in_threadpool(iterator):
                    yield chunk
                    await limits.check(gen_stats)
        except BaseException as exc:  # includes client disconnects (CancelledError)
            error = exc
            raise
        finally:
            if iterator is not None:
                iterator.close()
            if error is not None and gen_stats.finish_reason is None:
                gen_stats.finish_reason = {"cancelled": "cancelled", "shutdown": "cancelled",
                                           "timeout": "timeout"}.get(error_kind(error), "error")
            stats = self._report(context, plan, model, engine_name, gen_stats, start_unix, cache, baseline, error,
                                 queue_s)
            if fallback_error is not None:
                stats.kv["fallback_from_error"] = repr(fallback_error)
            if error is None:
                yield stats

    def _report(self, context: InferenceContext, plan: RunPlan | None, model: LoadedModel, engine_name: str,
                gen_stats: GenerationStats, start_unix: float, cache: Any, baseline: bool,
                error: BaseException | None, queue_s: float) -> InferenceStats:
        """Build InferenceStats, record them for /stats and hand them to PostRun."""
        try:
            kv = cache.kv_stats().to_dict() if hasattr(cache, "kv_stats") else {}
        except Exception:  # a damaged cache must not hide the request's own outcome
            log.exception("kv_stats of the request's cache failed")
            kv = {}
        stats = stats_from_generation(context.request_id, model.name, engine_name, gen_stats, start_unix, kv,
                                      baseline=baseline, error=None if error is None else repr(error),
                                      error_kind=None if error is None else error_kind(error), queue_s=queue_s)
        self.host_stats.record(stats)
        try:
            self.pm.hook.post_run(context=context, plan=plan, stats=stats, cache=cache)
        except Exception:  # a plugin's bookkeeping must not turn a served request into a failure
            log.exception("post_run hook failed")
        return stats
