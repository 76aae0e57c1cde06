"""What PreRun sees and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lemonade_inferos.engine.kv import KVCache
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.kvcache.plan import KVPlan


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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunPlan:
    """PreRun's answer: how to run this request.

    ``make_cache`` builds the KV cache for the engine the host picked (the
    plugin restores a cached prefix into it); the host hands that cache to the
    engine and back to PostRun.
    """

    session: SessionPolicy | None = None
    kv_plan: KVPlan | None = None
    make_cache: Callable[[Any], KVCache] | None = None
    run_options: dict[str, str] = field(default_factory=dict)
    baseline: bool = False
    policy_version: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
