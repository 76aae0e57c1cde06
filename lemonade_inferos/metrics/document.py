"""Rendering a :class:`~lemonade_inferos.metrics.snapshot.ControllerSnapshot` to the ``/v1/metrics`` JSON.

The wire shape is the design document's: megabytes and milliseconds, the long document with the short
(``?view=summary``) keys also at its top. Units are converted here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable

from lemonade_inferos.kvcache.plan import TIER_NAMES
from lemonade_inferos.metrics.snapshot import ControllerSnapshot, LatencySummary, WindowSnapshot

MB = 2**20
GPU_PROVIDERS = {"DmlExecutionProvider", "CUDAExecutionProvider"}
NPU_PROVIDERS = {"VitisAIExecutionProvider"}
KV_STATS_KEYS = ("tokens_by_tier", "bytes_by_tier", "blocks_sealed", "block_layers_quantized", "blocks_evicted",
                 "compression_vs_fp16", "compression_vs_model_dtype", "quantize_seconds", "working_buffer_bytes",
                 "working_buffer_used_bytes", "live_bytes", "live_form", "tokens_seen", "tokens_held")
SUMMARY_KEYS = ("timestamp", "tps", "ftl_ms", "mem", "util", "quality_summary", "kv_summary")


def iso(timestamp: float | None, timespec: str = "seconds") -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(
        timespec=timespec).replace("+00:00", "Z")


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def latency_ms(summary: LatencySummary) -> dict[str, float | None]:
    return {"mean_ms": _ms(summary.mean_s), "median_ms": _ms(summary.median_s), "p95_ms": _ms(summary.p95_s),
            "p99_ms": _ms(summary.p99_s), "std_ms": _ms(summary.std_s)}


def latency_summary_ms(values: Iterable[float]) -> dict[str, float | None]:
    """Mean, median, p95, p99 and std in ms of durations in seconds (all None when there are none)."""
    return latency_ms(LatencySummary.of(values))


def window_sections(window: WindowSnapshot) -> dict[str, Any]:
    """The recorder's sections: the window, throughput, latencies, the process's memory and CPU, the totals."""
    ttft = latency_ms(window.ttft)
    return {
        "timestamp": iso(window.at_unix, "milliseconds"),
        "measurement_window": {"duration_seconds": window.window_s, "sample_count": window.sample_count,
                               "description": f"requests that ended in the last {window.window_s:.0f} s"},
        "throughput": {"tokens_per_second": window.tokens_per_second,
                       "requests_per_second": window.requests_per_second,
                       "decode_tokens_per_second": window.decode_tokens_per_second,
                       "calculation": "total_tokens / total_time_seconds",
                       "note": "tokens_per_second and requests_per_second: generated tokens and requests over the "
                               "time from the first request's start in the window to now (idle time included); "
                               "decode_tokens_per_second: generated tokens over the time spent decoding them (what "
                               "a client sees while its reply streams)"},
        "latency": {**latency_ms(window.latency), "queue_wait": latency_ms(window.queue_wait),
                    "calculation": "end_time - arrival_time per request (queue wait included)"},
        "first_token_latency": {**{k: ttft[k] for k in ("mean_ms", "median_ms", "p95_ms")},
                                "measurement_method": "measured: first token produced - request start",
                                "note": "measured at the first emitted token, not estimated"},
        "memory": {"rss_mb": window.rss_bytes / MB, "peak_usage_mb": window.peak_rss_bytes / MB,
                   "total_allocated_mb": window.rss_bytes / MB},
        "device_utilization": {
            "cpu_utilization": window.cpu_utilization, "system_cpu_utilization": window.system_cpu_utilization,
            "npu_utilization": None, "dml_utilization": None,
            "reason": "NPU and DirectML utilisation need the Windows drivers' counters; not measurable here"},
        "totals": window.totals.to_dict(),
    }


def quality_section(snapshot: ControllerSnapshot) -> dict[str, Any]:
    quality, rate = snapshot.quality, snapshot.window.accept_rate
    return {"delta_ppl_est": quality.estimate, "guard": quality.guard,
            "full_evaluation": quality.full_evaluation, "light_evaluation": quality.light_evaluation,
            "max_delta_ppl": quality.max_delta_ppl,
            "accept_rate": {"current": rate.current,
                            "method": "accepted / drafted tokens over the last requests that drafted",
                            "window": rate.window, "sample_count": rate.sample_count,
                            "drafted_tokens_total": rate.drafted_tokens_total,
                            "accepted_tokens_total": rate.accepted_tokens_total,
                            "target": quality.min_accept_rate, "mode": quality.speculative_mode}}


def kv_memory_section(snapshot: ControllerSnapshot) -> dict[str, Any]:
    """The KV part of ``memory``: the caches now (MB), the last request's cache (bytes), the reuse tiers."""
    memory, kv, reuse = snapshot.kv_memory, snapshot.last_kv, snapshot.reuse
    return {"kv_cache_usage_mb": memory.usage_bytes / MB if memory else None,
            "kv_live_mb": memory.live_bytes / MB if memory else None,
            "kv_at_rest_mb": memory.at_rest_bytes / MB if memory else None,
            "kv_running_requests": memory.running_requests if memory else None,
            "last_request_live_bytes": kv.live_bytes if kv else None,
            "last_request_at_rest_bytes": kv.kv_bytes if kv else None,
            "live_form": memory.live_form if memory else None,
            "kv_cache_hit_rate": reuse.store.hit_rate if reuse else None,
            "prefix_cache_bytes": reuse.store.bytes if reuse else None,
            "warm_cache_bytes": reuse.warm.bytes if reuse else None,
            "kv_bytes_by_tier": dict(kv.bytes_by_tier) if kv else None,
            "memory_pressure": snapshot.memory_pressure}


def summary_sections(snapshot: ControllerSnapshot) -> dict[str, Any]:
    """The short shape's keys, also at the top of the full document (none clashes with the long shape's keys).

    ``vram_gb`` and ``util.npu``/``util.igpu`` are 0.0 where no session runs on a GPU or an NPU (nothing is used
    there) and null where one does but this machine gives no counter for it.
    """
    window, memory = snapshot.window, snapshot.kv_memory
    gpu_in_use = bool(snapshot.providers & GPU_PROVIDERS)
    npu_in_use = bool(snapshot.providers & NPU_PROVIDERS)
    return {
        # no request ended in the window: no token was produced in it (0.0 is the measurement, not a stand-in)
        "tps": window.tokens_per_second or 0.0,
        "ftl_ms": _ms(window.ttft.mean_s),
        "mem": {"vram_gb": None if gpu_in_use else 0.0, "system_gb": snapshot.system_memory_used_bytes / 1e9,
                "process_rss_gb": window.rss_bytes / 1e9,
                "kv_cache_gb": memory.usage_bytes / 1e9 if memory else None},
        "util": {"npu": None if npu_in_use else 0.0, "igpu": None if gpu_in_use else 0.0,
                 "cpu": window.cpu_utilization},
        "quality_summary": {"delta_ppl_est": snapshot.quality.delta_ppl,
                            "accept_rate": window.accept_rate.current},
        "kv_summary": kv_summary(snapshot),
    }


def kv_summary(snapshot: ControllerSnapshot) -> dict[str, Any]:
    kv, reuse = snapshot.last_kv, snapshot.reuse
    tokens = kv.tokens_by_tier if kv else {}
    levels = {name[:2]: round(float(tokens.get(name, 0) or 0), 1) for name in TIER_NAMES.values()}
    return {"total_chunks": kv.blocks_sealed if kv else None, "level_distribution": levels if tokens else None,
            "compression_ratio": kv.compression_vs_fp16 if kv else None,
            "hit_rate": reuse.store.hit_rate if reuse else None}


def metrics_document(snapshot: ControllerSnapshot) -> dict[str, Any]:
    """``GET /v1/metrics``: the recorder's sections, the controller's, and the short shape's keys on top."""
    document = window_sections(snapshot.window)
    document["memory"].update(kv_memory_section(snapshot))
    kv = snapshot.last_kv.to_dict() if snapshot.last_kv is not None else {}
    document.update({
        "quality": quality_section(snapshot), "optimization_status": snapshot.optimization,
        "loops": snapshot.loops, "agent": snapshot.agent,
        "servers": {sid: iso(at) for sid, at in snapshot.servers.items()},
        "kv_stats": {key: kv.get(key) for key in KV_STATS_KEYS} if kv else {},
        "prefix_cache": snapshot.reuse.to_dict() if snapshot.reuse is not None else {},
    })
    return {**document, **summary_sections(snapshot)}


def summary_document(snapshot: ControllerSnapshot) -> dict[str, Any]:
    """The design document's short metrics shape (``GET /v1/metrics?view=summary``)."""
    out = {"timestamp": iso(snapshot.window.at_unix, "milliseconds"), **summary_sections(snapshot)}
    out["quality"], out["kv_stats"] = out.pop("quality_summary"), out.pop("kv_summary")
    return out
