"""The embedded controller: owns the policy and everything measured about how it works.

The plugin asks it, before every run, for the request's plan (``planner.py``, from the effective policy of
``effective.py``: the configured policy with the active fallbacks, the guard's cap, the device substitutions and
the thread policy applied, each with its reason). After every run it gets the
measured InferenceStats and what actually ran. It keeps metrics over time windows, a persistent history, the
quality guard, the fallback manager and the quality scheduler, runs its three loops (``loops.py``), and serves
all of it through the control API (``api.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from lemonade_inferos.controller import planner
from lemonade_inferos.controller.agent import AgentLink
from lemonade_inferos.config.files import ConfigError, InferOSConfig
from lemonade_inferos.controller.effective import EffectivePolicy, RunState, resolve
from lemonade_inferos.controller.fallbacks import Fallbacks, NotificationLog
from lemonade_inferos.controller.guard import QualityGuard, ShadowSample
from lemonade_inferos.controller.loops import ControllerLoops
from lemonade_inferos.controller.owner import ControllerOwner
from lemonade_inferos.controller.planner import PlanState, RequestPlan
from lemonade_inferos.config.policy import Policy
from lemonade_inferos.controller.schedule import EvaluationSchedule
from lemonade_inferos.controller.threads import ThreadPolicy
from lemonade_inferos.engine.session import SessionPolicy, available_providers
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats
from lemonade_inferos.kvcache.stats import KVStats
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0, TIER_NAMES, KVPlan
from lemonade_inferos.metrics.recorder import History, MetricsRecorder
from lemonade_inferos.paths import inferos_home
from lemonade_inferos.config.settings import InferosSettings, SettingsSources

log = logging.getLogger(__name__)

CAP_NAMES = {TIER_INT4: "INT4", TIER_INT8: "INT8", TIER_L0: "FP16"}   # the guard's cap on block tiers


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


class Controller:
    def __init__(self, sources: SettingsSources | None = None, *, settings: InferosSettings | None = None,
                 policy: Policy | None = None,
                 memory_limit_bytes: int | None = None, history_path: Path | None = None,
                 config_path: Path | None = None, guard_options: dict[str, Any] | None = None,
                 importance: str | None = None, owner: ControllerOwner | None = None,
                 server_id: str = "local") -> None:
        """Settings come from ``sources`` (the plugin's layers); without them, from the keyword arguments alone
        (tests and tools). ``owner``: the plugin's side (``owner.py``); without one, no caches are reported, no
        full evaluation can run and the loops run as if a request always did."""
        if sources is None:
            options = {key: value for key, value in (("config", config_path), ("history_path", history_path),
                                                      ("guard", guard_options), ("importance", importance),
                                                      ("memory_limit", memory_limit_bytes)) if value is not None}
            sources = SettingsSources(options=options, environ={}, use_files=False)
        self._lock = threading.RLock()
        self.sources = sources
        self.settings = settings or sources.load()   # ``settings``: already loaded from ``sources``
        if policy is not None:
            self.settings = self.settings.model_copy(update={"policy": policy})
        self._started = self.settings  # what the process started with (a changed start-only field needs a restart)
        self.config = self.settings.infer_os()
        self.config_error: dict[str, Any] | None = None
        self.config_source = "settings"
        self.restart_required: list[str] = []
        self.policy_version = 1
        self.baseline = False
        self.memory_limit_bytes = self.settings.memory_limit
        self._process = psutil.Process()
        self.recorder = MetricsRecorder()
        self.history = History(self.settings.history_path or inferos_home() / "history.jsonl")
        self.guard = QualityGuard(lambda: self.policy.quality.max_delta_ppl, self._guard_transition,
                                  **(self.settings.guard or {}))
        self.owner = owner
        self.fallbacks = Fallbacks(self.notify, NotificationLog(self.settings.notifications))
        self.threads = ThreadPolicy()
        self.last_kv_stats: KVStats | None = None
        self.last_ran: dict[str, Any] | None = None
        self.full_evaluation: dict[str, Any] = {"status": "never_run"}
        self.light_evaluation: dict[str, Any] = {"status": "never_run"}
        self.schedule = EvaluationSchedule(self.settings.quality_schedule)
        self.agent = AgentLink(self.settings.agent_url, server_id) if self.settings.agent_url else None
        self.servers: dict[str, float] = {}   # as a sidecar agent: server id -> its last report
        self._mtimes = self._file_mtimes()
        self._pending_mtimes: dict[Path, int] | None = None
        self._last_snapshot = time.monotonic()
        self.loops = ControllerLoops(self._loop_periods, owner.busy if owner is not None else (lambda: True))
        self._add_loop_tasks()

    # -- settings, policy and config files -------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self.config.policy

    @property
    def importance(self) -> str:
        return self.settings.importance

    @property
    def config_path(self) -> Path | None:
        return self.sources.config_path

    def update_policy(self, update: dict[str, Any], source: str = "POST /v1/policy") -> Policy:
        """Merge a partial policy; invalid updates raise and change nothing."""
        with self._lock:
            new = self.policy.merged(update)
            self.config = InferOSConfig(policy=new, loops=self.config.loops)
            self.policy_version += 1
            self.config_source = source
        self.notify({"kind": "policy", "version": self.policy_version, "update": update, "source": source})
        return new

    def apply_config(self, config: InferOSConfig, source: str) -> None:
        """A whole config document (``POST /v1/config``): policy and loops replaced."""
        with self._lock:
            self.config = config
            self.policy_version += 1
            self.config_error = None
            self.config_source = source
        self.notify({"kind": "config", "version": self.policy_version, "source": source})

    def reject_config(self, error: ConfigError) -> None:
        self.config_error = {"message": str(error), **error.details(), "at": time.time()}
        self.notify({"kind": "config_rejected", **self.config_error})

    def reload_config(self, source: str = "reload") -> InferOSConfig:
        """Read every settings layer again now; a bad one raises ConfigError and the settings in force stay."""
        try:
            settings = self.sources.load()
        except ConfigError as exc:
            self.reject_config(exc)
            raise
        self.apply_settings(settings, source)
        return self.config

    def apply_settings(self, settings: InferosSettings, source: str) -> None:
        old = self.settings
        with self._lock:
            self.settings = settings
            self.config = settings.infer_os()
            self.memory_limit_bytes = settings.memory_limit
            self.restart_required = settings.restart_fields(self._started)
            self.policy_version += 1
            self.config_error = None
            self.config_source = source
        self.fallbacks.notifications.settings = settings.notifications
        if settings.quality_schedule != old.quality_schedule:
            self.schedule.configure(settings.quality_schedule)
        if self.owner is not None:
            self.owner.settings_changed(old, settings)
        self.notify({"kind": "config", "version": self.policy_version, "source": source,
                     "restart_required": self.restart_required})

    def check_config_files(self) -> None:
        """The slow loop's hot reload: any watched file (plugin.toml, the user's copy, --config) changed. A change is
        read once the files' times have held for one more round, so a file caught half-written by a non-atomic save
        is not what gets judged."""
        mtimes = self._file_mtimes()
        if mtimes == self._mtimes:
            self._pending_mtimes = None
            return
        if mtimes != self._pending_mtimes:
            self._pending_mtimes = mtimes   # seen once: read it at the next round if it still holds
            return
        changed = sorted(str(p) for p in set(mtimes) | set(self._mtimes) if mtimes.get(p) != self._mtimes.get(p))
        self._mtimes, self._pending_mtimes = mtimes, None
        try:
            self.reload_config(source=", ".join(changed))
        except ConfigError as exc:
            log.error("config edit rejected, keeping the running settings: %s", exc)
        else:
            log.info("settings reloaded after an edit of %s", ", ".join(changed))

    def _file_mtimes(self) -> dict[Path, int]:
        out = {}
        for path in self.sources.watched_paths():
            try:
                out[path] = path.stat().st_mtime_ns
            except OSError:
                continue
        return out

    # -- loops ---------------------------------------------------------------------------------------------
    def _loop_periods(self) -> dict[str, float]:
        loops = self.config.loops
        return {"fast": loops.fast_ms / 1000, "mid": loops.mid_ms / 1000, "slow": loops.slow_ms / 1000}

    def _add_loop_tasks(self) -> None:
        self.loops.add("fast", "memory_pressure", lambda: self.fallbacks.check_memory(self.memory_pressure()))
        self.loops.add("mid", "thread_policy", self.threads.measure)
        self.loops.add("mid", "device_retry", self.fallbacks.check_devices)
        self.loops.add("slow", "config_files", self.check_config_files)
        self.loops.add("slow", "quality_schedule", self.run_due_evaluations)
        self.loops.add("slow", "history_snapshot", self.snapshot_if_due)
        if self.agent is not None:
            self.loops.add("mid", "agent_policy", self.sync_agent_policy)
            self.loops.add("slow", "agent_stats", self.agent.flush)

    def snapshot_if_due(self) -> None:
        """A metrics snapshot into the history every ``history_period_s``."""
        now = time.monotonic()
        if now - self._last_snapshot >= self.settings.history_period_s:
            self._last_snapshot = now
            self.history.append({"kind": "snapshot", **self.metrics()})

    def start(self) -> None:
        self._last_snapshot = time.monotonic()
        self.loops.start()

    def stop(self) -> None:
        self.loops.stop()

    def set_baseline(self, enable: bool) -> None:
        self.baseline = enable
        self.notify({"kind": "baseline", "enabled": enable})

    def _guard_transition(self, event: dict[str, Any]) -> None:
        if self.owner is not None:
            self.owner.guard_stepped(event)
        self.fallbacks.quality_step(event)
        self.notify(event)

    def notify(self, event: dict[str, Any]) -> None:
        """A notification: logged and kept in the history."""
        entry = {"timestamp": time.time(), **event}
        log.info("controller event: %s", entry)
        self.history.append(entry)

    # -- the sidecar agent ---------------------------------------------------------------------------------
    def sync_agent_policy(self) -> None:
        policy = self.agent.fetch_policy() if self.agent is not None else None
        if policy is not None and policy != self.policy.model_dump():
            try:
                new = Policy.model_validate(policy)
            except Exception as exc:  # a newer agent's field: keep ours and say why
                self.agent.error = f"the agent's policy is not valid here: {exc}"
                return
            self.update_policy(new.model_dump(), source=f"agent {self.agent.url}")

    # -- what PreRun applies -------------------------------------------------------------------------------
    def memory_pressure(self) -> float:
        """Process RSS over ``--memory-limit`` when set, else system memory in use; in [0, 1]."""
        if self.memory_limit_bytes:
            return min(1.0, self._process.memory_info().rss / self.memory_limit_bytes)
        return psutil.virtual_memory().percent / 100.0

    def run_state(self, measure: bool = True) -> RunState:
        pressure = self.memory_pressure()
        if measure:
            self.fallbacks.check_memory(pressure)
        guard_tier = self.guard.max_tier
        return RunState(available_providers=frozenset(available_providers()),
                        lost_devices=tuple(self.fallbacks.lost_devices), memory_pressure=self.fallbacks.memory_pressure,
                        pressure=pressure, guard_level=self.guard.level, guard_action=self.guard.status()["action"],
                        guard_max_tier_name=CAP_NAMES.get(guard_tier, str(guard_tier)),
                        evictions_allowed=self.guard.evictions_allowed,
                        allow_spinning=self.threads.allow_spinning() if measure else not self.threads.busy,
                        other_cores=self.threads.others_cores, baseline_reason=self.baseline_reason)

    @property
    def baseline_reason(self) -> str | None:
        if self.baseline:
            return "baseline mode set through POST /v1/baseline"
        if self.fallbacks.in_backoff:
            return self.fallbacks.baseline_reason or "fallback backoff"
        return None

    def effective(self, measure: bool = True) -> EffectivePolicy:
        return resolve(self.policy, self.run_state(measure))

    def plan_state(self, chat_acceptance: float | None = None) -> PlanState:
        """What the planner reads besides the request, measured now (``chat_acceptance``: the plugin's memory of
        this chat's last drafting acceptance)."""
        return PlanState(self.effective(), self.importance, self.guard.max_tier, self.guard.evictions_allowed,
                         int(self.settings.prefix_cache_mb * 2**20), self.guard.estimate().get("current"),
                         self.recorder.prefill_rate(live_form="int8"), chat_acceptance)

    def plan_request(self, context: InferenceContext, chat_acceptance: float | None = None) -> RequestPlan:
        """Everything one request runs with (``planner.py``)."""
        return planner.plan(context, self.plan_state(chat_acceptance))

    def kv_plan(self) -> KVPlan:
        """The effective policy's KV plan, before any request's asks."""
        return planner.kv_plan(self.plan_state())

    def session_policy(self) -> SessionPolicy:
        return planner.session_policy(self.effective(), self.importance)

    @property
    def use_baseline(self) -> bool:
        return self.baseline or self.fallbacks.in_backoff

    def policy_document(self) -> dict[str, Any]:
        """``GET /v1/policy``: configured and effective policies, the overrides between them, where they came from;
        ``last_request_overrides``: what the last request served changed on top of them (its own asks, its chat's
        drafting, the prefix budget under pressure: ``planner.py``)."""
        effective = self.effective(measure=False)
        return {"policy": self.policy.model_dump(), "configured": self.policy.model_dump(),
                "effective": effective.policy.model_dump(),
                "overrides": [o.to_dict() for o in effective.overrides],
                "last_request_overrides": (self.last_ran or {}).get("overrides", []),
                "version": self.policy_version, "source": self.config_source,
                "layers": list(self.sources.layer_sources),
                "restart_required": self.restart_required, "last_error": self.config_error}

    # -- what PostRun reports --------------------------------------------------------------------------------
    def record(self, stats: InferenceStats, ran: dict[str, Any] | None = None) -> None:
        self.recorder.record(stats)
        if stats.kv is not None:
            self.last_kv_stats = stats.kv
        if self.agent is not None:
            self.agent.report(stats)
        if stats.baseline:
            return
        if ran is not None and stats.error_kind is None:
            self.last_ran = {**ran, "at": stats.end_unix}
        if stats.error_kind == "stalled":
            self.fallbacks.stalled(stats.error or "")
        elif stats.error_kind == "fault":  # only our engine's own faults open the fallback, never a bad request
            self.fallbacks.backend_error(stats.error or "")
            if ran is not None:
                self.fallbacks.device_error(list(ran.get("devices") or []), stats.error or "")
        elif stats.error is None:
            self.fallbacks.backend_ok()

    def note_server(self, server_id: str) -> None:
        """A server that reported stats to this controller (the sidecar agent's view of its servers)."""
        self.servers[server_id] = time.time()

    def add_shadow_sample(self, sample: ShadowSample) -> None:
        self.guard.add(sample)

    # -- evaluations -------------------------------------------------------------------------------------------
    def run_due_evaluations(self) -> None:
        """The quality scheduler (slow loop): the evaluations due now, each in the background."""
        for kind, context in self.schedule.due():
            if self.owner is None:
                return
            self._start_evaluation(kind, context, 0.0)

    def schedule_full_evaluation(self, context: int = 512, delay_s: float = 0.0) -> dict[str, Any]:
        """Run ``inferos eval ppl`` for the active plan in the background (after ``delay_s``)."""
        if self.owner is None:
            raise RuntimeError("no evaluation runner: the inferos plugin is not loaded")
        return self._start_evaluation("full", context, delay_s)

    def _start_evaluation(self, kind: str, context: int, delay_s: float) -> dict[str, Any]:
        current = self.full_evaluation if kind == "full" else self.light_evaluation
        if current.get("status") in ("scheduled", "running"):
            return current
        self._set_evaluation(kind, {**current, "status": "scheduled", "context": context,
                                    "started_for": iso(time.time() + delay_s)})

        def run() -> None:
            time.sleep(delay_s)
            self._set_evaluation(kind, {**self._evaluation(kind), "status": "running"})
            try:
                result = self.owner.full_evaluation(context)
            except Exception as exc:
                self._set_evaluation(kind, {"status": "failed", "error": repr(exc), "last_run": iso(time.time())})
                return
            within = result["delta_ppl"] <= self.policy.quality.max_delta_ppl
            self._set_evaluation(kind, {
                "status": "within_threshold" if within else "over_threshold", "last_run": iso(time.time()),
                "dataset": f"pydoc_data.topics, {context} tokens", "baseline_ppl": result["ppl_fp"],
                "current_ppl": result["ppl"], "delta_ppl": result["delta_ppl"], "kld": result["kld"],
                "top1": result["top1"], "plan": result["plan"]})
            self.notify({"kind": f"{kind}_evaluation", **self._evaluation(kind)})

        threading.Thread(target=run, name=f"inferos-{kind}-eval", daemon=True).start()
        return self._evaluation(kind)

    def _evaluation(self, kind: str) -> dict[str, Any]:
        document = self.full_evaluation if kind == "full" else self.light_evaluation
        return {**document, "next_scheduled": iso(self.schedule.next.get(kind))}

    def _set_evaluation(self, kind: str, value: dict[str, Any]) -> None:
        if kind == "full":
            self.full_evaluation = value
        else:
            self.light_evaluation = value

    # -- the metrics documents --------------------------------------------------------------------------------
    def optimization_status(self) -> dict[str, Any]:
        """What ran in the last request our engine served (not what the config says), and why where it differs."""
        ran, policy = self.last_ran, self.policy
        status: dict[str, Any] = {"baseline_mode": self.use_baseline, "current_policy": policy.kv.mode,
                                  "policy_version": self.policy_version, "thread_policy": self.threads.status(),
                                  "fallbacks": self.fallbacks.status(), "last_run": ran}
        if ran is None:
            status.update({"kv_quantization_active": None, "io_binding_active": None,
                           "hybrid_scheduling_active": None, "kv_eviction_active": None, "prefix_reuse_active": None,
                           "reason": "no request has run on our engine yet"})
            return status
        status.update({"kv_quantization_active": bool(ran.get("kv_quantized")),
                       "io_binding_active": bool(ran.get("io_binding")),
                       "hybrid_scheduling_active": bool(ran.get("hybrid")),
                       "hybrid_scheduling_reason": None if ran.get("hybrid") else
                       "prefill and decode resolved to the same device and session options",
                       "kv_eviction_active": bool(ran.get("kv_evicted")),
                       "prefix_reuse_active": bool(ran.get("prefix_reused")), "live_form": ran.get("live_form")})
        return status

    def metrics(self) -> dict[str, Any]:
        kv = self.last_kv_stats.to_dict() if self.last_kv_stats is not None else {}
        prefix = self.owner.prefix_stats() if self.owner is not None else {}
        memory = self.owner.kv_memory() if self.owner is not None else None
        status = self.policy
        extra = {
            "quality": {"delta_ppl_est": self.guard.estimate(), "guard": self.guard.status(),
                        "full_evaluation": self._evaluation("full"), "light_evaluation": self._evaluation("light"),
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
            "optimization_status": self.optimization_status(),
            "loops": self.loops.status(),
            "agent": self.agent.status() if self.agent is not None else None,
            "servers": {sid: iso(at) for sid, at in self.servers.items()},
            "kv_stats": {key: kv.get(key) for key in ("tokens_by_tier", "bytes_by_tier", "blocks_sealed",
                                                      "block_layers_quantized", "blocks_evicted",
                                                      "compression_vs_fp16", "compression_vs_model_dtype",
                                                      "quantize_seconds", "working_buffer_bytes",
                                                      "working_buffer_used_bytes", "live_bytes", "live_form",
                                                      "tokens_seen", "tokens_held")} if kv else {},
            "prefix_cache": prefix,
        }
        document = self.recorder.snapshot(extra)
        return {**document, **summary_keys(document, self._summary_kv(kv, prefix))}

    def summary(self) -> dict[str, Any]:
        """The design document's short metrics shape (``GET /v1/metrics?view=summary``)."""
        document = self.metrics()
        keys = ("timestamp", "tps", "ftl_ms", "mem", "util", "quality_summary", "kv_summary")
        out = {key: document[key] for key in keys}
        out["quality"], out["kv_stats"] = out.pop("quality_summary"), out.pop("kv_summary")
        return out

    def _summary_kv(self, kv: dict[str, Any], prefix: dict[str, Any]) -> dict[str, Any]:
        tokens = (kv or {}).get("tokens_by_tier") or {}
        levels = {name[:2]: round(float(tokens.get(name, 0) or 0), 1) for name in TIER_NAMES.values()}
        ratio = (kv or {}).get("compression_vs_fp16")
        return {"total_chunks": (kv or {}).get("blocks_sealed"), "level_distribution": levels if tokens else None,
                "compression_ratio": ratio, "hit_rate": prefix.get("hit_rate")}


def summary_keys(document: dict[str, Any], kv_summary: dict[str, Any]) -> dict[str, Any]:
    """The short shape's keys, also at the top of the full document (none clashes with the long shape's keys).

    ``vram_gb`` and ``util.npu``/``util.igpu`` are 0.0 where no session runs on a GPU or an NPU (nothing is used
    there) and null where one does but this machine gives no counter for it.
    """
    providers = set(available_providers())
    gpu_in_use = bool(providers & {"DmlExecutionProvider", "CUDAExecutionProvider"})
    npu_in_use = "VitisAIExecutionProvider" in providers
    estimate = document["quality"]["delta_ppl_est"]
    utilization = document["device_utilization"]
    memory = document["memory"]
    return {
        # no request ended in the window: no token was produced in it (0.0 is the measurement, not a stand-in)
        "tps": document["throughput"]["tokens_per_second"] or 0.0,
        "ftl_ms": document["first_token_latency"]["mean_ms"],
        "mem": {"vram_gb": None if gpu_in_use else 0.0,
                "system_gb": psutil.virtual_memory().used / 1e9,
                "process_rss_gb": memory["rss_mb"] * 2**20 / 1e9,
                "kv_cache_gb": (memory["kv_cache_usage_mb"] or 0.0) * 2**20 / 1e9
                if memory.get("kv_cache_usage_mb") is not None else None},
        "util": {"npu": None if npu_in_use else 0.0, "igpu": None if gpu_in_use else 0.0,
                 "cpu": utilization["cpu_utilization"]},
        "quality_summary": {"delta_ppl_est": estimate.get("current"),
                            "accept_rate": document["quality"]["accept_rate"]["current"]},
        "kv_summary": kv_summary,
    }
