"""Turning an engine's timings into :class:`~lemonade_inferos.hooktypes.InferenceStats` (what PostRun sees)."""

from __future__ import annotations

import time

import psutil

from lemonade_inferos.engine.types import GenerationStats
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.kvcache.stats import KVStats


def _peak_rss() -> int | None:
    """Peak RSS of this process where the OS reports it (Linux: ru_maxrss in KiB; Windows: peak_wset)."""
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):
        return int(info.peak_wset)
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, AttributeError):
        return None


def stats_from_generation(request_id: str, model: str, engine: str, gen: GenerationStats, start_unix: float,
                          kv: KVStats | None = None, baseline: bool = False,
                          error: str | None = None, error_kind: str | None = None,
                          queue_s: float = 0.0) -> InferenceStats:
    """Turn the engine's timings into the record PostRun and /stats see."""
    end = gen.end_time or time.perf_counter()
    times = gen.token_times
    return InferenceStats(
        request_id=request_id, model=model, engine=engine, start_unix=start_unix,
        end_unix=start_unix + (end - gen.start_time), prompt_n=gen.prompt_n, cache_n=gen.cache_n,
        predicted_n=gen.predicted_n, prompt_ms=gen.prompt_ms, ttft_s=gen.ttft_s, predicted_ms=gen.predicted_ms,
        predicted_per_second=gen.predicted_per_second, prompt_per_second=gen.prompt_per_second,
        latency_s=queue_s + end - gen.start_time, finish_reason=gen.finish_reason,
        decode_token_times_s=[b - a for a, b in zip(times, times[1:])],
        rss_bytes=psutil.Process().memory_info().rss, peak_rss_bytes=_peak_rss(),
        kv_bytes_by_tier=dict(kv.bytes_by_tier) if kv is not None else {}, kv=kv, baseline=baseline, error=error,
        error_kind=error_kind, queue_wait_s=queue_s, drafted_n=gen.drafted_n, accepted_n=gen.accepted_n)
