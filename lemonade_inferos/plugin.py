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
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lemonade_inferos.controller.activity import RequestActivity
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.controller.server import ControlServer
from lemonade_inferos.controller.shadow import shadow_score
from lemonade_inferos.controller.sizes import parse_size
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.hooktypes import InferenceContext, InferenceStats, RunPlan
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import KVPlan
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.reuse import PrefixReuse
from lemonade_inferos.kvcache.rope import rope_tables
from lemonade_inferos.kvcache.warm import WarmCaches
from lemonade_inferos.metrics.prometheus import ControllerCollector
from lemonade_inferos.metrics.recorder import SnapshotLoop
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

INTERRUPTED = ("cancelled", "shutdown", "timeout")  # error kinds of runs ended between two tokens
CHATS_REMEMBERED = 256    # chats whose last drafting acceptance is kept
CHAT_KEY_TOKENS = 64      # a chat is known by the model and the first tokens of its prompt
IMPORTANCE_SIGNALS = ("attention", "key_norm", "recency")
DEFAULT_CONFIG = {"kv_mode": None, "recent_window": None, "prefix_cache_mb": 256, "control_port": None,
                  "memory_limit": None, "config": None, "control_api": True, "shadow_every": 8, "warm_caches": 1,
                  "shadow_max_tokens": 512, "history_path": None, "guard": None, "history_period_s": 10.0,
                  "prefix_spill_mb": 1024, "prefix_spill_dir": None, "importance": "attention"}


@dataclass
class RequestRecord:
    """What one request's hooks share: set by pre_run and make_cache, read and dropped by post_run."""

    kv_plan: KVPlan
    max_tier: int
    engine: Any = None
    salt: bytes = b""
    chat: bytes = b""                  # the chat this request belongs to (its drafting acceptance is remembered)
    cache: Any = None                  # the request's live cache, while it runs (its bytes are reported)


class InferosPlugin:
    """Hook implementations plus what they share: the controller, prefix reuse, the shadow worker."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = {**DEFAULT_CONFIG, **{k: v for k, v in (config or {}).items() if v is not None}}
        if self.config["importance"] not in IMPORTANCE_SIGNALS:
            raise ValueError(f"--inferos-importance must be attention, key_norm or recency, "
                             f"got {self.config['importance']!r}")
        self.prefix_budget_bytes = int(float(self.config["prefix_cache_mb"]) * 2**20)
        spill_dir = Path(self.config["prefix_spill_dir"] or inferos_home() / "prefix-cache")
        store = PrefixStore(self.prefix_budget_bytes, spill_dir=spill_dir,
                            spill_budget_bytes=int(float(self.config["prefix_spill_mb"]) * 2**20))
        # live caches are bounded by the prefix store's budget too (their buffers are full precision)
        warm = WarmCaches(int(self.config["warm_caches"]), min_tokens=store.block_size,
                          max_bytes=self.prefix_budget_bytes)
        self.reuse = PrefixReuse(store, warm)
        self.controller = Controller(
            memory_limit_bytes=parse_size(self.config["memory_limit"]) if self.config["memory_limit"] else None,
            config_path=Path(self.config["config"]) if self.config["config"] else None,
            history_path=Path(self.config["history_path"]) if self.config["history_path"] else None,
            guard_options=self.config["guard"], importance=self.config["importance"],
            prefix_stats=self.reuse.stats, kv_memory=self.kv_memory, evaluation_runner=self._full_evaluation,
            on_guard_step=self._on_guard_step)
        overrides = {k: v for k, v in (("mode", self.config["kv_mode"]),
                                       ("recent_window", self.config["recent_window"])) if v is not None}
        if overrides:
            self.controller.update_policy({"kv": overrides})
        self._records: dict[str, RequestRecord] = {}
        self._chat_acceptance: OrderedDict[bytes, float] = OrderedDict()  # chat -> its last turn's acceptance
        self._records_lock = threading.Lock()
        self._shadow_counter = itertools.count()
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferos-shadow")
        self.activity = RequestActivity()  # shadow passes run between requests, never beside one
        self.control_server: ControlServer | None = None
        self._snapshots = SnapshotLoop(self.controller.metrics, self.controller.history,
                                       float(self.config["history_period_s"]))
        self._last_engine: Any = None

    @property
    def warm(self) -> WarmCaches:
        return self.reuse.warm

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def host_startup(self, host: Any) -> None:
        self.controller.watch_config()
        self._snapshots.start()
        # one exposition: the controller's families join the host's /metrics (the host counts the totals)
        host.prometheus_registry.register(ControllerCollector(self.controller.metrics, totals=False))
        host.stat_sources["kv_memory"] = self.kv_memory
        if self.config["control_api"]:
            self.control_server = ControlServer(self.controller, self.config["control_port"])
            started = self.control_server.start()
            host.extras["control_api"] = {"url": f"http://127.0.0.1:{self.control_server.port}/v1",
                                          "running": started, "error": self.control_server.error}
        log.info("inferos plugin active: kv mode %s, prefix cache %.0f MiB", self.controller.policy.kv.mode,
                 self.reuse.store.budget_bytes / 2**20)

    @hookimpl
    def host_shutdown(self, host: Any) -> None:
        self.controller.stop()
        self._snapshots.stop()
        self.reuse.store.flush()
        self.activity.close()
        self._shadow.shutdown(wait=False, cancel_futures=True)
        if self.control_server:
            self.control_server.stop()
        log.info("inferos plugin stopped; prefix store %s", self.reuse.store.stats())

    @hookimpl
    def pre_run(self, context: InferenceContext) -> RunPlan:
        controller = self.controller
        if controller.use_baseline:
            return RunPlan(baseline=True, policy_version=controller.policy_version)
        kv_plan = controller.kv_plan()
        under_pressure = controller.fallbacks.memory_pressure
        self.reuse.store.set_budget(self.prefix_budget_bytes // (2 if under_pressure else 1))
        if under_pressure:
            self.warm.clear()  # live fp caches are the first memory to give back
        with self._records_lock:
            record = self._records[context.request_id] = RequestRecord(kv_plan, controller.guard.max_tier,
                                                                       chat=_chat_key(context))
        speculation = controller.speculation(self._draft_tokens_for(record.chat))
        return RunPlan(session=controller.session_policy(), speculation=speculation,
                       policy_version=controller.policy_version,
                       notes={"guard_level": controller.guard.level, "pressure": kv_plan.pressure,
                              "num_draft_tokens": speculation.num_draft_tokens})

    @hookimpl(wrapper=True)
    def run_generation(self, context: InferenceContext, plan: RunPlan, run: Any):
        self.activity.begin(context.request_id)
        try:
            return (yield)
        finally:
            self.activity.end(context.request_id)

    @hookimpl
    def make_cache(self, context: InferenceContext, plan: RunPlan, engine: Any) -> TieredKVCache | None:
        record = self._record(context.request_id)
        if record is None:
            return None
        self._last_engine = engine
        record.engine = engine
        layout = engine.layout_for(record.kv_plan)  # INT8 live, or the model's dtype (guard's last steps)
        record.salt = PrefixStore.salt(engine.folder.fingerprint, self._kv_format(layout, record.kv_plan))
        rope = rope_tables(engine)
        cache, _ = self.reuse.acquire(context.prompt_ids, record.salt, layout, record.kv_plan,
                                      record.max_tier, lambda: TieredKVCache(layout, record.kv_plan, rope))
        record.cache = cache
        return cache

    @hookimpl
    def post_run(self, context: InferenceContext, plan: RunPlan | None, stats: InferenceStats, cache: Any) -> None:
        with self._records_lock:
            record = self._records.pop(context.request_id, None)
        self.controller.record(stats)
        if record is not None and stats.drafted_n:
            self._remember_acceptance(record.chat, stats.accepted_n / stats.drafted_n)
        # a run that ended early (client gone, time limit, shutdown) holds valid KV up to its last token: keep
        # it, a resent request or the next start reuses it; a fault's or a rejected request's cache is dropped
        if (record is None or record.engine is None or not isinstance(cache, TieredKVCache)
                or stats.error_kind not in (None, *INTERRUPTED)):
            return
        every = int(self.config["shadow_every"])
        if stats.error is None and every > 0 and next(self._shadow_counter) % every == 0 and cache.plan.quantizes:
            self._shadow.submit(self._shadow_pass, record.engine, list(cache.token_ids), cache.plan,
                                rope_tables(record.engine), cache.max_tier)
        # under memory pressure the store's INT8 copy is enough: the live cache is not kept
        self.reuse.release(cache, record.salt, keep_warm=not self.controller.fallbacks.memory_pressure)

    # -- what is measured on demand ---------------------------------------------------------------------
    def kv_memory(self) -> dict[str, Any]:
        """KV bytes now: the live caches of running requests (working buffer + demoted blocks' codes) and what is
        kept at rest between requests (the prefix store in memory, the warm caches), measured from their arrays."""
        with self._records_lock:
            running = [r.cache for r in self._records.values() if r.cache is not None]
        live = sum(cache.nbytes for cache in running)
        reuse = self.reuse.stats()
        at_rest = int(reuse.get("bytes") or 0) + int((reuse.get("warm") or {}).get("bytes") or 0)
        engine = self._last_engine
        return {"live_bytes": live, "live_working_buffer_bytes": sum(c.buffer.nbytes for c in running),
                "running_requests": len(running), "at_rest_bytes": at_rest,
                "prefix_store_bytes": reuse.get("bytes"), "warm_cache_bytes": (reuse.get("warm") or {}).get("bytes"),
                "kv_cache_usage_bytes": live + at_rest,
                "live_form": engine.live_kv_report() if engine is not None else None}

    # -- helpers -----------------------------------------------------------------------------------
    def _draft_tokens_for(self, chat: bytes) -> int:
        """The policy's draft length, shortened for a chat whose last turn accepted less than
        ``quality.min_accept_rate`` of its drafts (it starts more cautiously; the acceptance watch does the rest)."""
        policy = self.controller.policy
        tokens, target = policy.speculative.num_draft_tokens, policy.quality.min_accept_rate
        with self._records_lock:
            last = self._chat_acceptance.get(chat)
        if last is None or target <= 0 or last >= target:
            return tokens
        return max(1, int(tokens * last / target))

    def _remember_acceptance(self, chat: bytes, rate: float) -> None:
        with self._records_lock:
            self._chat_acceptance[chat] = rate
            self._chat_acceptance.move_to_end(chat)
            while len(self._chat_acceptance) > CHATS_REMEMBERED:
                self._chat_acceptance.popitem(last=False)

    def _record(self, request_id: str) -> RequestRecord | None:
        with self._records_lock:
            return self._records.get(request_id)

    def _shadow_pass(self, engine: Any, token_ids: list[int], plan: Any, rope: Any, max_tier: int) -> None:
        try:
            sample = shadow_score(engine, token_ids, plan, rope, max_tier, int(self.config["shadow_max_tokens"]),
                                  before_chunk=self.activity.wait_idle)
        except Exception:
            log.exception("shadow pass failed")
            return
        if sample is not None:
            self.controller.add_shadow_sample(sample)

    def _full_evaluation(self, context: int) -> dict[str, Any]:
        """``inferos eval ppl`` of the active plan on the engine that served the last request."""
        from lemonade_inferos.eval.ppl import eval_ppl

        if self._last_engine is None:
            raise RuntimeError("no request has been served yet, so there is no loaded engine to evaluate")
        plan = self.controller.kv_plan()  # exactly as requests run it, importance signal included
        named = replace(plan, name=f"{plan.name}@{plan.pressure:.2f}")
        return eval_ppl(self._last_engine, [named], context=context, recent_window=plan.recent_window)[0]

    def _on_guard_step(self, event: dict[str, Any]) -> None:
        """A step back re-prefills affected sessions: blocks stored beyond the new cap leave the prefix store."""
        if event["to_level"] > event["from_level"]:
            event["prefix_blocks_dropped"] = self.reuse.store.drop_above(self.controller.guard.max_tier)
            event["warm_caches_dropped"] = self.warm.clear()

    @staticmethod
    def _kv_format(layout: Any, plan: KVPlan) -> str:
        live = f"int8:{layout.scales.fingerprint}" if layout.live_int8 else str(layout.dtype)
        return f"{live}|block{plan.block_size}|group{plan.group_size}"


def _chat_key(context: InferenceContext) -> bytes:
    head = ",".join(map(str, context.prompt_ids[:CHAT_KEY_TOKENS]))
    return hashlib.blake2b(f"{context.model_path}|{head}".encode(), digest_size=16).digest()
