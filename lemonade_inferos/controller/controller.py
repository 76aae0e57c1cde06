"""The embedded controller: owns the policy and everything measured about how it works.

The plugin asks it, before every run, for a KV plan and session options (with
the quality guard's cap and the active fallbacks applied) and reports, after
every run, the measured InferenceStats. It keeps metrics over time windows, a
persistent history, the quality guard and the fallback state, and serves all of
it through the control API (``api.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil

from lemonade_inferos.controller.config import ConfigError, ConfigWatcher, InferOSConfig, load_config
from lemonade_inferos.controller.fallbacks import Fallbacks
from lemonade_inferos.controller.guard import QualityGuard, ShadowSample
from lemonade_inferos.controller.policy import Policy
from lemonade_inferos.controller.threads import ThreadPolicy
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.engine.speculative import SpeculationConfig
from lemonade_inferos.kvcache.plan import NEVER, TIER_INT8, KVPlan, plan_for_mode
from lemonade_inferos.metrics.recorder import History, MetricsRecorder
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

SCHEDULER_DEVICES = {"gpu_only": ["dml"], "npu_only": ["npu"]}


class Controller:
    def __init__(self, policy: Policy | None = None, memory_limit_bytes: int | None = None,
                 history_path: Path | None = None, config_path: Path | None = None,
                 guard_options: dict[str, Any] | None = None, importance: str = "attention",
                 prefix_stats: Callable[[], dict[str, Any]] | None = None,
                 kv_memory: Callable[[], dict[str, Any]] | None = None,
                 evaluation_runner: Callable[[int], dict[str, Any]] | None = None,
                 on_guard_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Collaborators come in here: ``importance`` (the block importance signal requests run with),
        ``prefix_stats`` (the prefix store's numbers for the metrics document), ``kv_memory`` (KV bytes live in
        running requests and at rest, measured now), ``evaluation_runner`` (a full
        ``inferos eval ppl`` of the active plan, for ``POST /v1/evaluate``) and ``on_guard_step`` (told of each
        guard transition before it is logged, e.g. to drop blocks beyond the new cap)."""
        self._lock = threading.RLock()
        self.config = InferOSConfig(policy=policy or Policy())
        self.config_path = config_path
        self.config_error: dict[str, Any] | None = None
        self.policy_version = 1
        self.baseline = False
        self.memory_limit_bytes = memory_limit_bytes
        self.importance = importance   # block importance signal (README: measured against the others)
        self.recorder = MetricsRecorder()
        self.history = History(history_path or inferos_home() / "history.jsonl")
        self.guard = QualityGuard(lambda: self.policy.quality.max_delta_ppl, self._guard_transition,
                                  **(guard_options or {}))
        self._on_guard_step = on_guard_step
        self.fallbacks = Fallbacks(self.notify)
        self.threads = ThreadPolicy()
        self.last_kv_stats: dict[str, Any] = {}
        self.prefix_stats = prefix_stats
        self.kv_memory = kv_memory
        self._watcher: ConfigWatcher | None = None
        self.full_evaluation_runner = evaluation_runner
        self.full_evaluation: dict[str, Any] = {"status": "never_run"}
        if config_path is not None:
            self.config = load_config(config_path)

    # -- policy and config ---------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self.config.policy

    def update_policy(self, update: dict[str, Any]) -> Policy:
        """Merge a partial policy; invalid updates raise and change nothing."""
        with self._lock:
            new = self.policy.merged(update)
            self.config = replace_policy(self.config, new)
            self.policy_version += 1
        self.notify({"kind": "policy", "version": self.policy_version, "update": update})
        return new

    def apply_config(self, config: InferOSConfig, source: str) -> None:
        with self._lock:
            self.config = config
            self.policy_version += 1
            self.config_error = None
        self.notify({"kind": "config", "version": self.policy_version, "source": source})

    def reject_config(self, error: ConfigError) -> None:
        self.config_error = {"message": str(error), **error.details(), "at": time.time()}
        self.notify({"kind": "config_rejected", **self.config_error})

    def reload_config(self) -> InferOSConfig:
        """Re-read the config file now (the reload call); raises ConfigError and keeps the old config."""
        if self.config_path is None:
            raise ConfigError("no config file was given (--config)", "none")
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.reject_config(exc)
            raise
        self.apply_config(config, str(self.config_path))
        return config

    def watch_config(self, interval_s: float = 1.0) -> None:
        if self.config_path is not None and self._watcher is None:
            self._watcher = ConfigWatcher(self.config_path, lambda c: self.apply_config(c, str(self.config_path)),
                                          self.reject_config, interval_s)
            self._watcher.start()

    def stop(self) -> None:
        if self._watcher:
            self._watcher.stop()

    def set_baseline(self, enable: bool) -> None:
        self.baseline = enable
        self.notify({"kind": "baseline", "enabled": enable})

    def _guard_transition(self, event: dict[str, Any]) -> None:
        if self._on_guard_step is not None:
            self._on_guard_step(event)
        self.notify(event)

    def notify(self, event: dict[str, Any]) -> None:
        """A notification: logged and kept in the history."""
        entry = {"timestamp": time.time(), **event}
        log.info("controller event: %s", entry)
        self.history.append(entry)

    # -- what PreRun applies -------------------------------------------------------------------
    def memory_pressure(self) -> float:
        """Process RSS over ``--memory-limit`` when set, else system memory in use; in [0, 1]."""
        if self.memory_limit_bytes:
            return min(1.0, psutil.Process().memory_info().rss / self.memory_limit_bytes)
        return psutil.virtual_memory().percent / 100.0

    def kv_plan(self) -> KVPlan:
        """The policy's plan with the fallbacks and the guard's cap applied."""
        kv = self.policy.kv
        t = kv.level_thresholds
        l1, l2, l3, window = t.L1_int8, t.L2_int4, t.L3_evict, kv.recent_window
        pressure = self.memory_pressure()
        self.fallbacks.check_memory(pressure)
        self.fallbacks.check_devices(self.devices())
        if self.fallbacks.device_missing:  # CPU fallback: be conservative with quality
            l1, l2, l3, window = min(1, l1 + 0.1), min(1, l2 + 0.1), min(1, l3 + 0.1), max(window, 128)
        if self.fallbacks.memory_pressure:  # compress harder
            l1, l2, l3, window = max(0, l1 - 0.1), max(0, l2 - 0.1), max(0, l3 - 0.1), max(16, window // 2)
        plan = plan_for_mode(kv.mode, recent_window=min(window, 512), l1_int8=l1, l2_int4=l2, l3_evict=l3)
        if not self.guard.evictions_allowed:
            plan = replace(plan, evict_below=NEVER)
        # INT8 live while the plan quantizes and the guard allows INT8; its "no quantization" and "full precision"
        # steps (and kv.mode disabled) run on the model's own KV dtype
        live = kv.live_format if plan.quantizes and self.guard.max_tier >= TIER_INT8 else "model"
        return replace(plan, pressure=pressure, importance=self.importance, live_kv=live)

    def speculation(self, num_draft_tokens: int | None = None) -> SpeculationConfig:
        """The policy's ``speculative`` section for one request (``num_draft_tokens`` overrides the policy's,
        for a chat whose last turn drafted poorly), enforcing ``quality.min_accept_rate``."""
        settings = self.policy.speculative.model_dump()
        if num_draft_tokens:
            settings["num_draft_tokens"] = num_draft_tokens
        return SpeculationConfig(**settings, min_accept_rate=self.policy.quality.min_accept_rate)

    def devices(self) -> list[str]:
        scheduler = self.policy.scheduler
        devices = SCHEDULER_DEVICES.get(scheduler.mode, [scheduler.prefill_device, scheduler.decode_device])
        return list(dict.fromkeys([*devices, "cpu"]))

    def session_policy(self) -> SessionPolicy:
        """Session options for the next request; spinning follows the measured load (``threads.py``)."""
        devices, io = self.devices(), self.policy.io
        return SessionPolicy(devices=devices, enable_iobinding=io.enable_iobinding,
                             dml_pool_bytes=io.dml_pool_bytes if "dml" in devices else None,
                             attention_probe=self.importance == "attention",
                             kv_cache=self.policy.kv.live_format,
                             allow_spinning=self.threads.allow_spinning())

    @property
    def use_baseline(self) -> bool:
        return self.baseline or self.fallbacks.in_backoff

    # -- what PostRun reports ------------------------------------------------------------------
    def record(self, stats: InferenceStats) -> None:
        self.recorder.record(stats)
        if stats.kv:
            self.last_kv_stats = stats.kv
        if stats.baseline:
            return
        if stats.error_kind == "fault":  # only our engine's own faults open the fallback, never a bad request
            self.fallbacks.backend_error(stats.error or "")
        elif stats.error is None:
            self.fallbacks.backend_ok()

    def add_shadow_sample(self, sample: ShadowSample) -> None:
        self.guard.add(sample)

    def schedule_full_evaluation(self, context: int = 512, delay_s: float = 0.0) -> dict[str, Any]:
        """Run ``inferos eval ppl`` for the active plan in the background (after ``delay_s``)."""
        if self.full_evaluation_runner is None:
            raise RuntimeError("no evaluation runner: the inferos plugin is not loaded")
        if self.full_evaluation.get("status") in ("scheduled", "running"):
            return self.full_evaluation
        self.full_evaluation = {**self.full_evaluation, "status": "scheduled",
                                "next_scheduled": time.time() + delay_s, "context": context}

        def run() -> None:
            time.sleep(delay_s)
            self.full_evaluation["status"] = "running"
            try:
                result = self.full_evaluation_runner(context)
            except Exception as exc:
                self.full_evaluation = {"status": "failed", "error": repr(exc), "last_run": time.time()}
                return
            within = result["delta_ppl"] <= self.policy.quality.max_delta_ppl
            self.full_evaluation = {"status": "within_threshold" if within else "over_threshold",
                                    "last_run": time.time(), "dataset": f"pydoc_data.topics, {context} tokens",
                                    "baseline_ppl": result["ppl_fp"], "current_ppl": result["ppl"],
                                    "delta_ppl": result["delta_ppl"], "kld": result["kld"], "top1": result["top1"],
                                    "plan": result["plan"]}
            self.notify({"kind": "full_evaluation", **self.full_evaluation})

        threading.Thread(target=run, name="inferos-full-eval", daemon=True).start()
        return self.full_evaluation

    # -- the metrics document ------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        kv = self.last_kv_stats
        prefix = self.prefix_stats() if self.prefix_stats is not None else {}
        memory = self.kv_memory() if self.kv_memory is not None else None
        status = self.policy
        extra = {
            "quality": {"delta_ppl_est": self.guard.estimate(), "guard": self.guard.status(),
                        "full_evaluation": self.full_evaluation,
                        "max_delta_ppl": status.quality.max_delta_ppl,
                        "accept_rate": {**self.recorder.accept_rate(), "target": status.quality.min_accept_rate,
                                        "mode": status.speculative.mode}},
            "memory": {"kv_cache_usage_mb": memory["kv_cache_usage_bytes"] / 2**20 if memory else None,
                       "kv_live_mb": memory["live_bytes"] / 2**20 if memory else None,
                       "kv_at_rest_mb": memory["at_rest_bytes"] / 2**20 if memory else None,
                       "kv_running_requests": memory.get("running_requests") if memory else None,
                       "last_request_live_bytes": kv.get("live_bytes") if kv else None,
                       "last_request_at_rest_bytes": kv.get("kv_bytes") if kv else None,
                       "live_form": memory.get("live_form") if memory else None,
                       "kv_cache_hit_rate": prefix.get("hit_rate"), "prefix_cache_bytes": prefix.get("bytes"),
                       "warm_cache_bytes": (prefix.get("warm") or {}).get("bytes"),
                       "kv_bytes_by_tier": kv.get("bytes_by_tier") if kv else None,
                       "memory_pressure": self.memory_pressure()},
            "optimization_status": {
                "baseline_mode": self.use_baseline, "kv_quantization_active": not self.use_baseline
                and status.kv.mode != "disabled" and self.guard.level < 2,
                "kv_eviction_active": not self.use_baseline and status.kv.mode != "disabled"
                and self.guard.evictions_allowed,
                "prefix_reuse_active": not self.use_baseline, "io_binding_active": status.io.enable_iobinding,
                "hybrid_scheduling_active": False,
                "hybrid_scheduling_reason": "one ONNX Runtime session per model; prefill/decode device split is not "
                                            "implemented",
                "current_policy": status.kv.mode, "policy_version": self.policy_version,
                "thread_policy": self.threads.status(),
                "fallbacks": self.fallbacks.status()},
            "kv_stats": {key: kv.get(key) for key in ("tokens_by_tier", "bytes_by_tier", "blocks_sealed",
                                                      "block_layers_quantized", "blocks_evicted",
                                                      "compression_vs_fp16", "compression_vs_model_dtype",
                                                      "quantize_seconds", "working_buffer_bytes",
                                                      "working_buffer_used_bytes", "live_bytes", "live_form",
                                                      "tokens_seen", "tokens_held")} if kv else {},
            "prefix_cache": prefix,
        }
        return self.recorder.snapshot(extra)


def replace_policy(config: InferOSConfig, policy: Policy) -> InferOSConfig:
    return InferOSConfig(policy=policy, loops=config.loops)
