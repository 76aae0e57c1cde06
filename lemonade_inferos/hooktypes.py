"""What the hooks pass (see ``hookspecs.py``): the run as the host knows it, PreRun's plan, and what was measured.

Host and plugins share these and nothing else: the KV plan, the prefix store and the controller are the
plugin's own business, so the host imports none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.speculative import SpeculationConfig
from lemonade_inferos.kvcache.stats import KVStats


@dataclass
class InferenceContext:
    """One generate call, as the host knows it before running."""

    request_id: str
    model: str
    model_path: str
    prompt_ids: list[int]
    max_tokens: int
    batch_size: int = 1
    target_ttft_ms: float | None = None
    quality_budget: float | None = None   # max ΔPPL the caller accepts
    endpoint: str = "chat/completions"
    context_length: int | None = None
    cache_prompt: bool = True             # llama.cpp's: False asks for a prefill from scratch (nothing reused)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, repetition_penalty, seed
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunPlan:
    """PreRun's answer: which engine and session options run this request (the cache comes from ``make_cache``)."""

    session: SessionPolicy | None = None
    run_options: dict[str, str] = field(default_factory=dict)
    speculation: SpeculationConfig | None = None   # draft and verify on our engine (None: plain decoding)
    baseline: bool = False
    policy_version: int | None = None
    stall_timeout_s: float | None = None           # a run without a new token this long is ended (the watchdog)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferenceStats:
    """What one generate call measured, handed to PostRun and kept for ``/stats``.

    Field names follow llama.cpp's ``timings`` (``prompt_n``, ``prompt_ms``, ``predicted_per_second``,
    ``cache_n``) so people who read llama-server output read these too. Every value is measured; what was not
    measured is ``None``.
    """

    request_id: str
    model: str
    engine: str
    start_unix: float
    end_unix: float
    prompt_n: int
    cache_n: int
    predicted_n: int
    prompt_ms: float | None
    ttft_s: float | None
    predicted_ms: float | None
    predicted_per_second: float | None
    prompt_per_second: float | None
    latency_s: float                    # from arrival (queue wait included) to the last token
    finish_reason: str | None
    decode_token_times_s: list[float] = field(default_factory=list)
    rss_bytes: int = 0
    peak_rss_bytes: int | None = None
    kv_bytes_by_tier: dict[str, int] = field(default_factory=dict)
    kv: KVStats | None = None            # what the request's KV cache measured (None: the engine's own cache)
    baseline: bool = False
    error: str | None = None
    error_kind: str | None = None       # request | cancelled | shutdown | timeout | stalled | fault (host/run.py)
    queue_wait_s: float = 0.0           # time waiting for the model's engine before the run began
    drafted_n: int = 0                  # speculative decoding: tokens drafted, and accepted by the model
    accepted_n: int = 0
    fallback_from_error: str | None = None   # served by the baseline after our engine failed with this

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
