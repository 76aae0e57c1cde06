"""The embedded controller: owns the policy and everything measured about how it works.

The plugin asks it, before every run, for the request's plan (``planner.py``, from the effective policy of
``effective.py``: the configured policy with the active fallbacks, the guard's cap, the device substitutions and
the thread policy applied, each with its reason). After every run it gets the
measured InferenceStats and what actually ran. It keeps metrics over time windows, a persistent history, the
quality guard, the fallback manager and the quality scheduler, runs its three loops (``loops.py``), and serves
all of it through the control API (``api.py``).

This class is the composition root: the one versioned policy lives in ``policy_store.py``, the scheduled
evaluations in ``evaluations.py``, the per-request decisions in ``planner.py``; what it measures is read as a
typed snapshot (``metrics/snapshot.py``) that ``metrics/document.py`` and ``metrics/prometheus.py`` render.
"""

from __future__ import annotations

import logging
import time
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
from lemonade_inferos.controller.policy_store import FileWatcher, PolicyStore
from lemonade_inferos.controller.schedule import EvaluationSchedule
from lemonade_inferos.controller.evaluations import Evaluations
from lemonade_inferos.controller.threads import ThreadPolicy
from lemonade_inferos.engine.session import SessionPolicy, available_providers
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats
from lemonade_inferos.kvcache.stats import KVStats
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0, KVPlan
from lemonade_inferos.metrics.document import metrics_document, summary_document
from lemonade_inferos.metrics.recorder import History, MetricsRecorder
from lemonade_inferos.metrics.snapshot import ControllerSnapshot, QualitySnapshot
from lemonade_inferos.paths import inferos_home
from lemonade_inferos.config.settings import InferosSettings, SettingsSources

log = logging.getLogger(__name__)

CAP_NAMES = {TIER_INT4: "INT4", TIER_INT8: "INT8", TIER_L0: "FP16"}   # the guard's cap on block tiers


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
        settings = settings or sources.load()   # ``settings``: already loaded from ``sources``
        if policy is not None:
            settings = settings.model_copy(update={"policy": policy})
        self.store = PolicyStore(sources, settings, self.notify)
        self.baseline = False
        self.memory_limit_bytes = settings.memory_limit
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
        self.evaluations = Evaluations(EvaluationSchedule(self.settings.quality_schedule),
                                       owner.full_evaluation if owner is not None else None,
                                       lambda: self.policy.quality.max_delta_ppl, self.notify)
        self.agent = AgentLink(self.settings.agent_url, server_id) if self.settings.agent_url else None
        self.servers: dict[str, float] = {}   # as a sidecar agent: server id -> its last report
        self.files = FileWatcher(self.sources.watched_paths)
        self._last_snapshot = time.monotonic()
        self.loops = ControllerLoops(self._loop_periods, owner.busy if owner is not None else (lambda: True))
        self._add_loop_tasks()

    # -- settings, policy and config files (policy_store.py holds the one versioned policy) ------------
    @property
    def settings(self) -> InferosSettings:
        return self.store.settings

    @property
    def sources(self) -> SettingsSources:
        return self.store.sources

    @property
    def config(self) -> InferOSConfig:
        return self.store.config

    @property
    def policy(self) -> Policy:
        return self.store.policy

    @property
    def policy_version(self) -> int:
        return self.store.version

    @property
    def config_source(self) -> str:
        return self.store.source

    @property
    def config_error(self) -> dict[str, Any] | None:
        return self.store.error

    @config_error.setter
    def config_error(self, value: dict[str, Any] | None) -> None:
        self.store.error = value

    @property
    def restart_required(self) -> list[str]:
        return self.store.restart_required

    @property
    def importance(self) -> str:
        return self.settings.importance

    @property
    def config_path(self) -> Path | None:
        return self.sources.config_path

    def update_policy(self, update: dict[str, Any], source: str = "POST /v1/policy") -> Policy:
        """Merge a partial policy; invalid updates raise and change nothing."""
        return self.store.update_policy(update, source)

    def apply_config(self, config: InferOSConfig, source: str) -> None:
        """A whole config document (``POST /v1/config``): policy and loops replaced."""
        self.store.apply_config(config, source)

    def reject_config(self, error: ConfigError) -> None:
        self.store.reject(error)

    def reload_config(self, source: str = "reload") -> InferOSConfig:
        """Read every settings layer again now; a bad one raises ConfigError and the settings in force stay."""
        self.apply_settings(self.store.load(), source)
        return self.config

    def apply_settings(self, settings: InferosSettings, source: str) -> None:
        """Reloaded settings in force, and applied to what the controller and its owner hold."""
        old = self.store.apply_settings(settings, source)
        self.memory_limit_bytes = settings.memory_limit
        self.fallbacks.notifications.settings = settings.notifications
        if settings.quality_schedule != old.quality_schedule:
            self.schedule.configure(settings.quality_schedule)
        if self.owner is not None:
            self.owner.settings_changed(old, settings)
        self.notify({"kind": "config", "version": self.policy_version, "source": source,
                     "restart_required": self.restart_required})

    def check_config_files(self) -> None:
        """The slow loop's hot reload: a watched file (plugin.toml, the user's copy, --config) changed."""
        changed = self.files.changed()
        if not changed:
            return
        try:
            self.reload_config(source=", ".join(changed))
        except ConfigError as exc:
            log.error("config edit rejected, keeping the running settings: %s", exc)
        else:
            log.info("settings reloaded after an edit of %s", ", ".join(changed))

    # -- loops ---------------------------------------------------------------------------------------------
    def _loop_periods(self) -> dict[str, float]:
        loops = self.settings.loops   # not self.config: that builds a document on every read
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
            try:
                self.update_policy(new.model_dump(), source=f"agent {self.agent.url}")
            except ConfigError as exc:  # e.g. a draft model this machine does not have
                self.agent.error = f"the agent's policy cannot run here: {exc}"

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

    # -- evaluations (evaluations.py) -------------------------------------------------------------------------
    @property
    def schedule(self) -> EvaluationSchedule:
        return self.evaluations.schedule

    @property
    def full_evaluation(self) -> dict[str, Any]:
        return self.evaluations.state("full")

    @property
    def light_evaluation(self) -> dict[str, Any]:
        return self.evaluations.state("light")

    def run_due_evaluations(self) -> None:
        """The quality scheduler (slow loop): the evaluations due now, each in the background."""
        self.evaluations.run_due()

    def schedule_full_evaluation(self, context: int = 512, delay_s: float = 0.0) -> dict[str, Any]:
        """Run ``inferos eval ppl`` for the active plan in the background (after ``delay_s``)."""
        return self.evaluations.start("full", context, delay_s)

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

    def snapshot(self) -> ControllerSnapshot:
        """Everything measured now, typed (``metrics/snapshot.py``); ``metrics()`` renders it to JSON."""
        policy = self.policy
        quality = QualitySnapshot(
            estimate=self.guard.estimate(), guard=self.guard.status(), full_evaluation=self.evaluations.document("full"),
            light_evaluation=self.evaluations.document("light"), max_delta_ppl=policy.quality.max_delta_ppl,
            min_accept_rate=policy.quality.min_accept_rate, speculative_mode=policy.speculative.mode)
        return ControllerSnapshot(
            window=self.recorder.snapshot(), quality=quality, memory_pressure=self.memory_pressure(),
            last_kv=self.last_kv_stats,
            kv_memory=(self.owner.kv_memory() or None) if self.owner is not None else None,
            reuse=(self.owner.prefix_stats() or None) if self.owner is not None else None,
            optimization=self.optimization_status(), loops=self.loops.status(),
            agent=self.agent.status() if self.agent is not None else None, servers=dict(self.servers),
            providers=frozenset(available_providers()), system_memory_used_bytes=psutil.virtual_memory().used)

    def metrics(self) -> dict[str, Any]:
        """``GET /v1/metrics`` (and each history snapshot)."""
        return metrics_document(self.snapshot())

    def summary(self) -> dict[str, Any]:
        """The design document's short metrics shape (``GET /v1/metrics?view=summary``)."""
        return summary_document(self.snapshot())
