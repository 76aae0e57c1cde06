"""The one place the hooks are called: every generate call goes through :meth:`GenerateService.open`.

    ticket = gate.admit()            (in the route, before any response starts: a full queue is a plain 503)
      ticket.slot()                  (queue: up to ``parallel`` generations per model, their steps in turn)
        plan = pre_run(context)      (first plugin to answer wins; None -> baseline og.Generator)
        run_generation(context, plan, run)   in a worker thread (host/run.py): make_cache, then the engine;
                                     chunks stream back; between chunks the loop ends the run early for a
                                     client that has gone, the time limit, or shutdown
        post_run(context, plan, stats, cache)   (always, also on error or client disconnect)

Only a ``fault`` of our engine before the first token is retried on the baseline engine, and only faults count
against our engine (``host/run.py`` sorts errors into kinds).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import anyio
import pluggy

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import GenerationStalled, ServerStopping
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats, RunPlan
from lemonade_inferos.host.models import LoadedModel, ModelManager, Ticket
from lemonade_inferos.host.run import GenerationRun, RunLimits, error_kind
from lemonade_inferos.host.telemetry import RequestTrace, Telemetry
from lemonade_inferos.metrics.host import HostStats
from lemonade_inferos.metrics.stats import stats_from_generation

log = logging.getLogger(__name__)
_END = object()  # the worker's last word on the queue
STALLED_JOIN_S = 10.0  # how long a stalled run's worker is waited for after ONNX Runtime was told to terminate


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
                 timeout_s: float = 600.0, telemetry: Telemetry | None = None) -> None:
        self.pm = pm
        self.models = models
        self.host_stats = host_stats
        self.timeout_s = timeout_s
        self.telemetry = telemetry or Telemetry("")
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Shutdown: refuse new runs and end running ones at their next token. Safe from a signal handler."""
        self.stopping.set()

    def open(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, endpoint: str,
             request_id: str | None = None,
             is_disconnected: Callable[[], Awaitable[bool]] | None = None, stream: bool = False,
             trace: RequestTrace | None = None, cache_prompt: bool = True) -> Run:
        """Admit a run now (503 ``server_busy`` when the queue is full, 503 while shutting down).

        ``stream``: the reply is streamed (``/health`` says ``is_streaming`` from its first chunk to its end);
        ``trace``: what the request's telemetry span needs from the route.
        """
        if self.stopping.is_set():
            raise ServerStopping("the server is shutting down; retry on its next start")
        ticket = model.gate.admit(len(prompt_ids))
        limits = RunLimits(self.timeout_s, self.stopping, is_disconnected)
        request_id = request_id or new_request_id()
        return Run(request_id, ticket, self._run(ticket, model, prompt_ids, params, endpoint, request_id, limits,
                                                 stream, trace, cache_prompt))

    async def _run(self, ticket: Ticket, model: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                   endpoint: str, request_id: str, limits: RunLimits, stream: bool, trace: RequestTrace | None,
                   cache_prompt: bool) -> AsyncIterator[GenerationChunk | InferenceStats]:
        """Yield chunks, then one final :class:`InferenceStats` (post_run sees errors too; they are re-raised)."""
        arrived = time.perf_counter()
        streaming = False
        try:
            async with ticket.slot():
                queue_s = time.perf_counter() - arrived
                limits.started = time.monotonic()  # the time limit is the generation's, not the queue's
                await limits.check(GenerationStats())
                async for item in self._generate(model, prompt_ids, params, endpoint, request_id, limits, queue_s,
                                                 trace, cache_prompt):
                    if stream and not streaming and isinstance(item, GenerationChunk):
                        streaming = True
                        model.streams += 1
                    yield item
        finally:
            if streaming:
                model.streams -= 1
            ticket.release()

    async def _generate(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, endpoint: str,
                        request_id: str, limits: RunLimits, queue_s: float, trace: RequestTrace | None,
                        cache_prompt: bool = True) -> AsyncIterator[GenerationChunk | InferenceStats]:
        context = InferenceContext(request_id=request_id, model=model.name, model_path=str(model.folder),
                                   prompt_ids=prompt_ids, max_tokens=params.max_tokens, endpoint=endpoint,
                                   context_length=model.ctx_size, cache_prompt=cache_prompt,
                                   sampling=params.settings())
        plan: RunPlan | None = self.pm.hook.pre_run(context=context)
        baseline = plan is None or plan.baseline
        # from here on PostRun sees every outcome: a failure to build our engine or its cache included
        engine_name = "og" if baseline else "inferos"
        run: GenerationRun | None = None
        start_unix = time.time()
        error: BaseException | None = None
        fallback_error: BaseException | None = None
        # the reply's text for the telemetry span (only while telemetry wants outputs)
        text = trace.output_parts if trace is not None and self.telemetry.enabled \
            and not self.telemetry.settings.hide_outputs else None
        try:
            try:
                run, start_unix = await self._new_run(model, plan, prompt_ids, params, limits), time.time()
                async for chunk in self._drive(context, plan, run, limits, text):
                    yield chunk
            except Exception as exc:
                if baseline or (run is not None and run.stats.predicted_n) or error_kind(exc) != "fault":
                    raise
                # our engine's own fault before any token: serve this request on the baseline engine
                log.exception("engine %s failed; serving this request on the baseline engine", engine_name)
                fallback_error = exc
                self._report(context, plan, model, engine_name, run, start_unix, False, exc, queue_s, None)
                engine_name, baseline = "og", True
                plan, run = RunPlan(baseline=True, notes={"fallback": repr(exc)}), None
                run, start_unix = await self._new_run(model, plan, prompt_ids, params, limits), time.time()
                async for chunk in self._drive(context, plan, run, limits, text):
                    yield chunk
        except BaseException as exc:  # includes client disconnects (CancelledError)
            error = exc
            if error_kind(exc) == "stalled":
                model.discard_engine(engine_name)  # the next request builds it anew
            raise
        finally:
            stats = self._report(context, plan, model, engine_name, run, start_unix, baseline, error, queue_s, trace)
            if fallback_error is not None:
                stats.fallback_from_error = repr(fallback_error)
            if error is None:
                yield stats

    async def _new_run(self, model: LoadedModel, plan: RunPlan | None, prompt_ids: list[int],
                       params: SamplingParams, limits: RunLimits) -> GenerationRun:
        """Build (or take) the engine, then start the time limit's clock: building an engine is loading the
        model (seconds on a slow machine, once per engine), not generating, and Lemonade times loads apart."""
        baseline = plan is None or plan.baseline
        engine = await asyncio.to_thread(model.engine, "og" if baseline else "inferos",
                                         None if baseline else plan.session)
        limits.started = time.monotonic()
        return GenerationRun(engine, baseline, prompt_ids, params, {} if plan is None else plan.run_options,
                             None if plan is None else plan.speculation)

    async def _drive(self, context: InferenceContext, plan: RunPlan | None, run: GenerationRun, limits: RunLimits,
                     text: list[str] | None = None) -> AsyncIterator[GenerationChunk]:
        """Execute ``run`` through the ``run_generation`` hook in a worker thread and yield its chunks.

        However the stream ends (done, an error, the limits, the consumer cancelled), the worker is told to stop
        and waited for, shielded from cancellation: PostRun must see a cache no thread is still writing.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        run.emit = lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk)
        effective = plan if plan is not None else RunPlan(baseline=True)

        def work() -> None:
            try:
                self.pm.hook.run_generation(context=context, plan=effective, run=run)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        done = loop.run_in_executor(None, work)
        stall_s = effective.stall_timeout_s
        stalled = False
        try:
            while True:
                try:
                    chunk = await (asyncio.wait_for(queue.get(), stall_s) if stall_s else queue.get())
                except asyncio.TimeoutError:
                    stalled = True
                    run.terminate()
                    raise GenerationStalled(
                        f"the generation produced no token for {stall_s:g} s (the watchdog, watchdog_s) after "
                        f"{run.stats.predicted_n} tokens; it was ended and the engine is rebuilt",
                        stalled_s=stall_s, completion_tokens=run.stats.predicted_n) from None
                if chunk is _END:
                    break
                if text is not None:
                    text.append(chunk.text)
                yield chunk
                await limits.check(run.stats)
            await done  # the worker's exception, if it raised
        finally:
            run.stop()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([done], timeout=STALLED_JOIN_S if stalled else None)
            if not done.done():
                log.error("a stalled generation's worker did not end %g s after ONNX Runtime was told to "
                          "terminate; its thread is abandoned", STALLED_JOIN_S)
                run.cache = None  # nobody may reuse what that thread may still write
            elif not done.cancelled():
                done.exception()  # retrieved: it was raised above or is superseded by the error in flight

    def _report(self, context: InferenceContext, plan: RunPlan | None, model: LoadedModel, engine_name: str,
                run: GenerationRun | None, start_unix: float, baseline: bool, error: BaseException | None,
                queue_s: float, trace: RequestTrace | None) -> InferenceStats:
        """Build InferenceStats, record them for /stats and hand them to PostRun."""
        gen_stats = run.stats if run is not None else GenerationStats()
        cache = run.cache if run is not None else None
        if error is not None and gen_stats.finish_reason is None:
            gen_stats.finish_reason = {"cancelled": "cancelled", "shutdown": "cancelled",
                                       "timeout": "timeout"}.get(error_kind(error), "error")
        try:
            kv = cache.kv_stats() if cache is not None else None
        except Exception:  # a damaged cache must not hide the request's own outcome
            log.exception("kv_stats of the request's cache failed")
            kv = None
        stats = stats_from_generation(context.request_id, model.name, engine_name, gen_stats, start_unix, kv,
                                      baseline=baseline, error=None if error is None else repr(error),
                                      error_kind=None if error is None else error_kind(error), queue_s=queue_s)
        self.host_stats.record(stats)
        try:
            self.pm.hook.post_run(context=context, plan=plan, stats=stats, cache=cache)
        except Exception:  # a plugin's bookkeeping must not turn a served request into a failure
            log.exception("post_run hook failed")
        self.telemetry.record(stats, trace, plan.notes if plan is not None else {})  # after PostRun: its notes
        return stats


async def collect(run) -> tuple[str, InferenceStats]:
    """A run's whole reply and its stats; its queue place is given back however it ends."""
    parts, stats = [], None
    try:
        async for item in run:
            if isinstance(item, GenerationChunk):
                parts.append(item.text)
            else:
                stats = item
    finally:
        run.release()
    return "".join(parts), stats
