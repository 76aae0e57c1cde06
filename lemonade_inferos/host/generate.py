"""The one place the hooks are called: every generate call goes through :meth:`GenerateService.stream`.

    gate.slot()                      (queue: one generation per model at a time)
      plan = pre_run(context)        (first plugin to answer wins; None -> baseline og.Generator)
      engine.generate(...)           (in a worker thread; chunks streamed back)
      post_run(context, plan, stats, cache)   (always, also on error or client disconnect)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pluggy
from starlette.concurrency import iterate_in_threadpool

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import GenerationError
from lemonade_inferos.host.context import InferenceContext, RunPlan
from lemonade_inferos.host.models import LoadedModel, ModelManager
from lemonade_inferos.metrics.stats import InferenceStats, stats_from_generation

log = logging.getLogger(__name__)


@dataclass
class HostStats:
    """What ``/stats`` reports: the last request and totals since start."""

    last: InferenceStats | None = None
    request_count_total: int = 0
    input_tokens_total: int = 0
    output_tokens_total: int = 0
    prompt_tokens_total: int = 0
    cache_tokens_total: int = 0
    errors_total: int = 0

    def record(self, stats: InferenceStats) -> None:
        self.last = stats
        self.request_count_total += 1
        self.prompt_tokens_total += stats.prompt_n
        self.cache_tokens_total += stats.cache_n
        self.input_tokens_total += stats.prompt_n - stats.cache_n
        self.output_tokens_total += stats.predicted_n
        self.errors_total += stats.error is not None


@dataclass
class Completion:
    """A streamed generation: chunks as they come, then the measured stats."""

    model: LoadedModel
    chunks: AsyncIterator[GenerationChunk]
    stats: GenerationStats
    request_id: str
    result: dict[str, Any] = field(default_factory=dict)


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


class GenerateService:
    def __init__(self, pm: pluggy.PluginManager, models: ModelManager, host_stats: HostStats) -> None:
        self.pm = pm
        self.models = models
        self.host_stats = host_stats

    async def stream(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                     endpoint: str, request_id: str | None = None) -> AsyncIterator[GenerationChunk | InferenceStats]:
        """Yield chunks, then one final :class:`InferenceStats` (post_run sees errors too; they are re-raised)."""
        request_id = request_id or new_request_id()
        async with model.gate.slot():
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
                except Exception as exc:
                    if baseline or gen_stats.predicted_n or isinstance(exc, GenerationError):
                        raise
                    # backend error before any token: serve this request on the baseline engine
                    log.exception("engine %s failed; serving this request on the baseline engine", engine_name)
                    fallback_error = exc
                    self._report(context, plan, model, engine_name, gen_stats, start_unix, cache, False, repr(exc))
                    if iterator is not None:
                        iterator.close()
                    engine_name, baseline, cache, plan = ("og", True, None,
                                                          RunPlan(baseline=True, notes={"fallback": repr(exc)}))
                    engine = await asyncio.to_thread(model.engine, "og")
                    gen_stats, start_unix = GenerationStats(), time.time()
                    iterator = engine.generate(prompt_ids, params, stats=gen_stats)
                    async for chunk in iterate_in_threadpool(iterator):
                        yield chunk
            except BaseException as exc:  # includes client disconnects (CancelledError)
                error = exc
                raise
            finally:
                if iterator is not None:
                    iterator.close()
                if error is not None and gen_stats.finish_reason is None:
                    gen_stats.finish_reason = "cancelled" if isinstance(error, asyncio.CancelledError) else "error"
                stats = self._report(context, plan, model, engine_name, gen_stats, start_unix, cache, baseline,
                                     None if error is None else repr(error))
                if fallback_error is not None:
                    stats.kv["fallback_from_error"] = repr(fallback_error)
                if error is None:
                    yield stats

    def _report(self, context: InferenceContext, plan: RunPlan | None, model: LoadedModel, engine_name: str,
                gen_stats: GenerationStats, start_unix: float, cache: Any, baseline: bool,
                error: str | None) -> InferenceStats:
        """Build InferenceStats, record them for /stats and hand them to PostRun."""
        kv = cache.kv_stats().to_dict() if hasattr(cache, "kv_stats") else {}
        stats = stats_from_generation(context.request_id, model.name, engine_name, gen_stats, start_unix, kv,
                                      baseline=baseline, error=error)
        self.host_stats.record(stats)
        try:
            self.pm.hook.post_run(context=context, plan=plan, stats=stats, cache=cache)
        except Exception:  # a plugin's bookkeeping must not turn a served request into a failure
            log.exception("post_run hook failed")
        return stats
