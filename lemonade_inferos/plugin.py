"""The inferos plugin: the hooks, and little else.

    pre_run         the controller's plan (or baseline), and this request's record (KV plan, guard cap)
    run_generation  wrapper: the server counts as busy for the whole run (background work waits for idle)
    make_cache      the best cache for the prompt: warm, restored from the prefix store, or fresh
    post_run        the measurements to the controller; the finished cache parked for the next turn

Registered through the ``lemonade_server.plugins`` entry point (name ``inferos``), like any third-party plugin.
Per-request state is a small record keyed by request id, never attributes on a shared object.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from lemonade_inferos.collaborators import CacheEngine, HostServices, RunHandle
from lemonade_inferos.controller.activity import RequestActivity
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.controller.server import ControlServer
from lemonade_inferos.controller.shadow import shadow_score
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats, RunPlan
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import KVPlan
from lemonade_inferos.plugins import PluginDisabled
from lemonade_inferos.config.settings import InferosSettings, SettingsSources
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.reuse import PrefixReuse
from lemonade_inferos.kvcache.reuse_stats import ReuseStats
from lemonade_inferos.kvcache.rope import rope_tables
from lemonade_inferos.kvcache.shared_tier import SharedTier
from lemonade_inferos.kvcache.warm import WarmCaches
from lemonade_inferos.metrics.prometheus import ControllerCollector
from lemonade_inferos.metrics.snapshot import KVMemory
from lemonade_inferos.paths import inferos_home
from lemonade_inferos.tuning.recorder import WorkloadRecorder

log = logging.getLogger(__name__)

INTERRUPTED = ("cancelled", "shutdown", "timeout")  # error kinds of runs ended between two tokens
CHATS_REMEMBERED = 256    # chats whose last drafting acceptance is kept
CHAT_KEY_TOKENS = 64      # a chat is known by the model and the first tokens of its prompt
PLUGIN_LOGGERS = ("lemonade_inferos.plugin", "lemonade_inferos.controller", "lemonade_inferos.kvcache",
                  "lemonade_inferos.engine", "lemonade_inferos.metrics", "lemonade_inferos.eval")


@dataclass
class RequestRecord:
    """What one request's hooks share: set by pre_run and make_cache, read and dropped by post_run."""

    kv_plan: KVPlan
    max_tier: int
    devices: list[str]
    engine: Any = None
    salt: bytes = b""
    chat: bytes = b""                  # the chat this request belongs to (its drafting acceptance is remembered)
    keep_warm: bool = True             # the plan's: the finished cache stays live for the next turn
    overrides: tuple = ()              # the request's own overrides (``planner.py``), for /v1/policy
    cache: Any = None                  # the request's live cache, while it runs (its bytes are reported)


class InferosPlugin:
    """Hook implementations plus what they share: the controller (whose owner it is: ``controller/owner.py``),
    prefix reuse, the shadow worker.

    Args:
        options: the host's pass-through options for this plugin (``--plugin-option inferos.KEY=VALUE``,
            ``--inferos-KEY VALUE``, ``--config``): the last layer of the settings (``settings.py``).

    Raises:
        PluginDisabled: ``INFEROS_ENABLED=false`` (or ``enabled = false`` in a settings layer).
        ConfigError: a settings layer holds a bad value (named with its source, line and field).
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.sources = SettingsSources(options=dict(options or {}))
        settings = self.sources.load()
        if not settings.enabled:
            raise PluginDisabled("inferos is disabled by its settings (INFEROS_ENABLED=false or enabled = false); "
                                 "the host serves with the baseline engine")
        _apply_log_level(settings.log_level)
        spill_dir = Path(settings.prefix_spill_dir or inferos_home() / "prefix-cache")
        shared = SharedTier(settings.prefix_store, settings.prefix_store_timeout_s) if settings.prefix_store else None
        store = PrefixStore(self._prefix_budget(settings), spill_dir=spill_dir,
                            spill_budget_bytes=int(settings.prefix_spill_mb * 2**20), shared=shared)
        # live caches are bounded by the prefix store's budget too (their buffers are full precision)
        warm = WarmCaches(settings.warm_caches, min_tokens=store.block_size, max_bytes=self._prefix_budget(settings))
        self.reuse = PrefixReuse(store, warm)
        self.activity = RequestActivity()  # shadow passes run between requests, never beside one
        self.controller = Controller(
            self.sources, settings=settings, owner=self, server_id=f"{socket.gethostname()}:{os.getpid()}")
        self._records: dict[str, RequestRecord] = {}
        self._chat_acceptance: OrderedDict[bytes, float] = OrderedDict()  # chat -> its last turn's acceptance
        self._records_lock = threading.Lock()
        self._recorder = WorkloadRecorder()
        self._shadow_counter = itertools.count()
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferos-shadow")
        self.control_server: ControlServer | None = None
        # the engine that served the last request, not kept alive by us: an unloaded model's sessions are freed
        self._last_engine: Callable[[], Any] = lambda: None

    @staticmethod
    def _prefix_budget(settings: InferosSettings) -> int:
        return int(settings.prefix_cache_mb * 2**20)

    @property
    def settings(self) -> InferosSettings:
        """The settings in force (the controller holds them: a reload replaces them there)."""
        return self.controller.settings

    @property
    def prefix_budget_bytes(self) -> int:
        return self._prefix_budget(self.controller.settings)

    @property
    def warm(self) -> WarmCaches:
        return self.reuse.warm

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def host_startup(self, host: HostServices) -> None:
        self.controller.start()
        # one exposition: the controller's families join the host's /metrics (the host counts the totals)
        host.register_collector(ControllerCollector(self.controller.snapshot, totals=False))
        host.add_stat_source("kv_memory", lambda: self.kv_memory().to_dict())
        if self.settings.control_api:
            self.control_server = ControlServer(self.controller, self.settings.control_port)
            if self.control_server.start():
                base = f"http://127.0.0.1:{self.control_server.port}"
                host.set_health_extra("control_api", {"url": f"{base}/v1", "dashboard": f"{base}/dashboard",
                                                      "running": True, "error": None})
            else:  # never another process's endpoints: none, and why
                host.set_health_extra("control_api", None)
                host.set_health_extra("control_api_error", self.control_server.error)
        log.info("inferos plugin active: kv mode %s, prefix cache %.0f MiB", self.controller.policy.kv.mode,
                 self.reuse.store.budget_bytes / 2**20)

    @hookimpl
    def host_shutdown(self, host: HostServices) -> None:
        self.controller.stop()
        self.reuse.store.flush()
        if self.reuse.store.shared is not None:
            self.reuse.store.shared.close()  # queued writes are sent first (for up to 2 s)
        self.activity.close()
        self._shadow.shutdown(wait=False, cancel_futures=True)
        if self.control_server:
            self.control_server.stop()
        log.info("inferos plugin stopped; prefix store %s", self.reuse.store.stats())

    @hookimpl
    def load_session(self, model_name: str) -> SessionPolicy | None:
        """The session the effective policy asks for now (the baseline's plain engine when it says baseline)."""
        return None if self.controller.use_baseline else self.controller.session_policy()

    @hookimpl
    def pre_run(self, context: InferenceContext) -> RunPlan:
        controller = self.controller
        if controller.settings.record is not None:  # --inferos-record FILE: the workload inferos ab/tune replay
            self._recorder.record(controller.settings.record, context)
        watchdog = controller.settings.watchdog_s or None
        if controller.use_baseline:
            return RunPlan(baseline=True, policy_version=controller.policy_version, stall_timeout_s=watchdog,
                           notes={"baseline_reason": controller.baseline_reason})
        chat = _chat_key(context)
        with self._records_lock:
            acceptance = self._chat_acceptance.get(chat)
        request = controller.plan_request(context, acceptance)
        self.reuse.store.set_budget(request.prefix_budget_bytes)
        if not request.keep_warm:
            self.warm.clear()  # live fp caches are the first memory to give back
        with self._records_lock:
            self._records[context.request_id] = RequestRecord(
                request.kv_plan, controller.guard.max_tier,
                [request.effective.prefill_device, request.effective.decode_device], chat=chat,
                keep_warm=request.keep_warm, overrides=request.request_overrides)
        return RunPlan(session=request.session, run_options=request.run_options, speculation=request.speculation,
                       policy_version=controller.policy_version, stall_timeout_s=watchdog,
                       notes={"guard_level": controller.guard.level, **request.notes()})

    @hookimpl(wrapper=True)
    def run_generation(self, context: InferenceContext, plan: RunPlan, run: RunHandle):
        self.activity.begin(context.request_id)
        try:
            return (yield)
        finally:
            self.activity.end(context.request_id)

    @hookimpl
    def make_cache(self, context: InferenceContext, plan: RunPlan, engine: CacheEngine) -> TieredKVCache | None:
        record = self._record(context.request_id)
        if record is None:
            return None
        self._last_engine = weakref.ref(engine)
        record.engine = engine
        layout = engine.layout_for(record.kv_plan)  # INT8 live, or the model's dtype (guard's last steps)
        record.salt = PrefixStore.salt(engine.folder.fingerprint, self._kv_format(layout, record.kv_plan))
        rope = rope_tables(engine)
        if context.cache_prompt:
            cache, _ = self.reuse.acquire(context.prompt_ids, record.salt, layout, record.kv_plan,
                                          record.max_tier, lambda: TieredKVCache(layout, record.kv_plan, rope))
        else:  # the caller asked for a prefill from scratch (llama.cpp's cache_prompt: false)
            cache = TieredKVCache(layout, record.kv_plan, rope)
            cache.max_tier = record.max_tier
        record.cache = cache
        return cache

    @hookimpl
    def post_run(self, context: InferenceContext, plan: RunPlan | None, stats: InferenceStats, cache: Any) -> None:
        with self._records_lock:
            record = self._records.pop(context.request_id, None)
        self.controller.record(stats, self._what_ran(record, stats) if record is not None else None)
        if record is not None and stats.drafted_n:
            self._remember_acceptance(record.chat, stats.accepted_n / stats.drafted_n)
        # a run that ended early (client gone, time limit, shutdown) holds valid KV up to its last token: keep
        # it, a resent request or the next start reuses it; a fault's or a rejected request's cache is dropped
        if (record is None or record.engine is None or not isinstance(cache, TieredKVCache)
                or stats.error_kind not in (None, *INTERRUPTED)):
            return
        every = self.controller.settings.shadow_every
        if stats.error is None and every > 0 and next(self._shadow_counter) % every == 0 and cache.plan.quantizes:
            self._shadow.submit(self._shadow_pass, weakref.ref(record.engine), list(cache.token_ids), cache.plan,
                                rope_tables(record.engine), cache.max_tier)
        # under memory pressure the store's INT8 copy is enough: the live cache is not kept
        self.reuse.release(cache, record.salt, keep_warm=record.keep_warm)

    @staticmethod
    def _what_ran(record: RequestRecord, stats: InferenceStats) -> dict[str, Any]:
        """What the request ran with, from the engine and the cache it used (optimization_status reports it)."""
        engine, kv = record.engine, stats.kv
        quantized = kv is not None and (any(kv.block_layers_quantized.values()) or kv.live_form == "int8")
        return {"devices": record.devices, "io_binding": engine.policy.enable_iobinding if engine else None,
                "hybrid": engine.hybrid if engine else False, "live_form": kv.live_form if kv else None,
                "kv_quantized": quantized, "kv_evicted": bool(kv and kv.blocks_evicted),
                "prefix_reused": stats.cache_n > 0, "plan": record.kv_plan.name,
                "overrides": [o.to_dict() for o in record.overrides],
                "sessions": engine.session_report() if engine else None}

    def settings_changed(self, old: InferosSettings, new: InferosSettings) -> None:
        """A reload: apply what the plugin owns at once (budgets, counts, the log level)."""
        _apply_log_level(new.log_level)
        self.reuse.store.set_budget(self._prefix_budget(new))
        self.warm.configure(new.warm_caches, self._prefix_budget(new))

    # -- the controller's owner (controller/owner.py) and what is measured on demand ----------------------
    def prefix_stats(self) -> ReuseStats:
        return self.reuse.snapshot()

    def busy(self) -> bool:
        return self.activity.in_flight > 0

    def kv_memory(self) -> KVMemory:
        """KV bytes now: the live caches of running requests (working buffer + demoted blocks' codes) and what is
        kept at rest between requests (the prefix store in memory, the warm caches), measured from their arrays."""
        with self._records_lock:
            running = [r.cache for r in self._records.values() if r.cache is not None]
        reuse = self.reuse.snapshot()
        engine = self._last_engine()
        return KVMemory(live_bytes=sum(cache.nbytes for cache in running),
                        live_working_buffer_bytes=sum(c.buffer.nbytes for c in running),
                        running_requests=len(running), at_rest_bytes=reuse.at_rest_bytes,
                        prefix_store_bytes=reuse.store.bytes, warm_cache_bytes=reuse.warm.bytes,
                        live_form=engine.live_kv_report() if engine is not None else None)

    # -- helpers -----------------------------------------------------------------------------------
    def _remember_acceptance(self, chat: bytes, rate: float) -> None:
        with self._records_lock:
            self._chat_acceptance[chat] = rate
            self._chat_acceptance.move_to_end(chat)
            while len(self._chat_acceptance) > CHATS_REMEMBERED:
                self._chat_acceptance.popitem(last=False)

    def _record(self, request_id: str) -> RequestRecord | None:
        with self._records_lock:
            return self._records.get(request_id)

    def _shadow_pass(self, engine_ref: Callable[[], Any], token_ids: list[int], plan: Any, rope: Any,
                     max_tier: int) -> None:
        """Score a finished request's tokens while the server is idle. It holds its engine only while it runs
        and gives way to any request (a pass resumes nothing): waiting with the engine in hand would keep a
        replaced session's memory alive across an unload or a policy switch."""
        if not self.activity.wait_idle():
            return
        engine = engine_ref()
        if engine is None or engine is not self._last_engine():
            return

        def still_idle() -> bool:
            return self.activity.wait_idle(timeout=0) and self._last_engine() is engine

        try:
            with engine.transient_forms():  # a reference form it loads is not held between passes
                sample = shadow_score(engine, token_ids, plan, rope, max_tier,
                                      self.controller.settings.shadow_max_tokens, before_chunk=still_idle)
        except Exception:
            log.exception("shadow pass failed")
            return
        if sample is not None:
            self.controller.add_shadow_sample(sample)

    def full_evaluation(self, context: int) -> dict[str, Any]:
        """``inferos eval ppl`` of the active plan on the engine that served the last request."""
        from lemonade_inferos.eval.ppl import eval_ppl

        engine = self._last_engine()
        if engine is None:
            raise RuntimeError("no loaded engine has served a request, so there is none to evaluate")
        plan = self.controller.kv_plan()  # exactly as requests run it, importance signal included
        named = replace(plan, name=f"{plan.name}@{plan.pressure:.2f}")
        with engine.transient_forms():
            return eval_ppl(engine, [named], context=context, recent_window=plan.recent_window)[0]

    def guard_stepped(self, event: dict[str, Any]) -> None:
        """A step back re-prefills affected sessions: blocks stored beyond the new cap leave the prefix store."""
        if event["to_level"] > event["from_level"]:
            event["prefix_blocks_dropped"] = self.reuse.store.drop_above(self.controller.guard.max_tier)
            event["warm_caches_dropped"] = self.warm.clear()

    @staticmethod
    def _kv_format(layout: Any, plan: KVPlan) -> str:
        live = f"int8:{layout.scales.fingerprint}" if layout.live_int8 else str(layout.dtype)
        return f"{live}|block{plan.block_size}|group{plan.group_size}"


def _apply_log_level(level: str | None) -> None:
    """``INFEROS_LOG_LEVEL`` / ``log_level``: the plugin's own loggers (the host's keep the host's level)."""
    for name in PLUGIN_LOGGERS:
        logging.getLogger(name).setLevel(level.upper() if level else logging.NOTSET)


def _chat_key(context: InferenceContext) -> bytes:
    head = ",".join(map(str, context.prompt_ids[:CHAT_KEY_TOKENS]))
    return hashlib.blake2b(f"{context.model_path}|{head}".encode(), digest_size=16).digest()
