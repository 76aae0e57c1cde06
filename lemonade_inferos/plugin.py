"""The inferos plugin: PreRun asks the embedded controller for a plan and restores cached prefixes;
PostRun reports what was measured, parks the KV blocks for the next turn and feeds the quality guard.

Registered through the ``lemonade_server.plugins`` entry point (name ``inferos``),
like any third-party plugin.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from lemonade_inferos.controller.activity import RequestActivity
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.controller.server import ControlServer
from lemonade_inferos.controller.shadow import shadow_score
from lemonade_inferos.controller.sizes import parse_size
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.host.context import InferenceContext, RunPlan
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_L0
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.rope import RopeTables
from lemonade_inferos.kvcache.stats import KVStats
from lemonade_inferos.kvcache.warm import WarmCaches
from lemonade_inferos.metrics.recorder import SnapshotLoop
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

INTERRUPTED = ("cancelled", "shutdown", "timeout")  # error kinds of runs ended between two tokens
DEFAULT_CONFIG = {"kv_mode": None, "recent_window": None, "prefix_cache_mb": 256, "control_port": None,
                  "memory_limit": None, "config": None, "control_api": True, "shadow_every": 8, "warm_caches": 1,
                  "shadow_max_tokens": 512, "history_path": None, "guard": None, "history_period_s": 10.0,
                  "prefix_spill_mb": 1024, "prefix_spill_dir": None, "importance": "attention"}


class InferosPlugin:
    """Hook implementations plus the state they share: the controller, the prefix store, the shadow worker."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = {**DEFAULT_CONFIG, **{k: v for k, v in (config or {}).items() if v is not None}}
        memory_limit = parse_size(self.config["memory_limit"]) if self.config["memory_limit"] else None
        config_path = Path(self.config["config"]) if self.config["config"] else None
        history_path = Path(self.config["history_path"]) if self.config["history_path"] else None
        self.controller = Controller(memory_limit_bytes=memory_limit, config_path=config_path,
                                     history_path=history_path, guard_options=self.config["guard"])
        overrides = {k: v for k, v in (("mode", self.config["kv_mode"]),
                                       ("recent_window", self.config["recent_window"])) if v is not None}
        if overrides:
            self.controller.update_policy({"kv": overrides})
        if self.config["importance"] not in ("attention", "key_norm", "recency"):
            raise ValueError(f"--inferos-importance must be attention, key_norm or recency, "
                             f"got {self.config['importance']!r}")
        self.controller.importance = self.config["importance"]
        self.prefix_budget_bytes = int(float(self.config["prefix_cache_mb"]) * 2**20)
        spill_dir = Path(self.config["prefix_spill_dir"] or inferos_home() / "prefix-cache")
        self.prefix_store = PrefixStore(self.prefix_budget_bytes, spill_dir=spill_dir,
                                        spill_budget_bytes=int(float(self.config["prefix_spill_mb"]) * 2**20))
        self.controller.prefix_stats = lambda: {**self.prefix_store.stats(), "warm": self.warm.stats()}
        guard_notify = self.controller.guard.on_transition
        self.controller.guard.on_transition = lambda event: (self._on_guard_step(event), guard_notify(event))
        self._ropes: dict[str, RopeTables | None] = {}
        self._requests = itertools.count()
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferos-shadow")
        self.activity = RequestActivity()  # shadow passes run between requests, never beside one
        # live caches are bounded by the prefix store's budget too (their buffers are full precision)
        self.warm = WarmCaches(int(self.config["warm_caches"]), min_tokens=self.prefix_store.block_size,
                               max_bytes=self.prefix_budget_bytes)
        self.control_server: ControlServer | None = None
        self._snapshots = SnapshotLoop(self.controller.metrics, self.controller.history,
                                       float(self.config["history_period_s"]))
        self.controller.full_evaluation_runner = self._full_evaluation
        self._last_engine: Any = None

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def host_startup(self, host: Any) -> None:
        self.controller.watch_config()
        self._snapshots.start()
        if self.config["control_api"]:
            self.control_server = ControlServer(self.controller, self.config["control_port"])
            started = self.control_server.start()
            host.extras["control_api"] = {"url": f"http://127.0.0.1:{self.control_server.port}/v1",
                                          "running": started, "error": self.control_server.error}
        log.info("inferos plugin active: kv mode %s, prefix cache %.0f MiB", self.controller.policy.kv.mode,
                 self.prefix_store.budget_bytes / 2**20)

    @hookimpl
    def host_shutdown(self, host: Any) -> None:
        self.controller.stop()
        self._snapshots.stop()
        self.prefix_store.flush()
        self.activity.close()
        self._shadow.shutdown(wait=False, cancel_futures=True)
        if self.control_server:
            self.control_server.stop()
        log.info("inferos plugin stopped; prefix store %s", self.prefix_store.stats())

    @hookimpl
    def pre_run(self, context: InferenceContext) -> RunPlan:
        self.activity.begin(context.request_id)
        controller = self.controller
        if controller.use_baseline:
            return RunPlan(baseline=True, policy_version=controller.policy_version)
        kv_plan = controller.kv_plan()
        self.prefix_store.set_budget(self.prefix_budget_bytes // (2 if controller.fallbacks.memory_pressure else 1))
        if controller.fallbacks.memory_pressure:
            self.warm.clear()  # live fp caches are the first memory to give back
        max_tier = controller.guard.max_tier
        prompt = context.prompt_ids

        def make_cache(engine: Any) -> TieredKVCache:
            self._last_engine = engine
            salt = PrefixStore.salt(engine.folder.fingerprint, self._kv_format(engine, kv_plan))
            # a cache that may not quantize reuses exact KV only: the guard's last step and kv.mode disabled
            # mean full precision, for the prefix too
            usable = TIER_L0 if max_tier == TIER_L0 or not kv_plan.quantizes else max_tier
            cache, reused = self._reuse(prompt, salt, engine, usable, kv_plan, max_tier)
            cache.engine, cache.prefix_salt = engine, salt
            self.prefix_store.record_lookup(len(prompt), reused)
            return cache

        return RunPlan(session=controller.session_policy(), kv_plan=kv_plan, make_cache=make_cache,
                       policy_version=controller.policy_version,
                       notes={"guard_level": controller.guard.level, "pressure": kv_plan.pressure})

    @hookimpl
    def post_run(self, context: InferenceContext, plan: RunPlan | None, stats: Any, cache: Any) -> None:
        self.activity.end(context.request_id)
        self.controller.record(stats)
        # a run that ended early (client gone, time limit, shutdown) holds valid KV up to its last token: keep
        # it, a resent request or the next start reuses it; a fault's or a rejected request's cache is dropped
        if not isinstance(cache, TieredKVCache) or stats.error_kind not in (None, *INTERRUPTED):
            return
        self.prefix_store.park(cache, cache.prefix_salt)
        every = int(self.config["shadow_every"])
        if stats.error is None and every > 0 and next(self._requests) % every == 0 and cache.plan.quantizes:
            self._shadow.submit(self._shadow_pass, cache.engine, list(cache.token_ids), cache.plan,
                                self._rope(cache.engine), cache.max_tier)
        cache.engine = None  # a kept cache must not keep an unloaded model's session alive
        if not self.controller.fallbacks.memory_pressure:  # under pressure the store's INT8 copy is enough
            self.warm.put(cache)

    # -- helpers -----------------------------------------------------------------------------------
    def _reuse(self, prompt: list[int], salt: bytes, engine: Any, usable: int, kv_plan: Any, max_tier: int
               ) -> tuple[TieredKVCache, int]:
        """The cache to run ``prompt`` in, holding the longest prefix found warm or in the prefix store."""
        block = self.prefix_store.block_size
        warm, common = self.warm.take(prompt, salt, engine.layout, usable)
        stored = [] if common >= (len(prompt) - 1) // block * block else \
            self.prefix_store.lookup(prompt, salt, usable, record=False)
        if warm is not None and common >= len(stored) * block:
            try:
                warm.truncate(common)
                warm.stats = KVStats()  # this request's work, not the earlier turns'
                warm.max_tier = max_tier  # before the plan is applied again
                warm.set_plan(kv_plan)
                return warm, common
            except Exception:  # that warm cache is damaged: it is dropped (not put back), the store serves
                log.exception("reusing a warm cache failed; dropping it")
                warm = None
                stored = self.prefix_store.lookup(prompt, salt, usable, record=False)
        if warm is not None:
            self.warm.put(warm)  # the store has more of this prompt; keep the warm one for its own conversation
        cache = self._new_cache(engine, kv_plan, max_tier)
        try:
            return cache, self.prefix_store.restore(cache, stored)
        except Exception:  # a damaged entry is that entry's fault: drop it and prefill instead
            log.exception("restoring %d prefix blocks failed; dropping them and prefilling the prompt", len(stored))
            self.prefix_store.discard(stored)
            return self._new_cache(engine, kv_plan, max_tier), 0

    def _new_cache(self, engine: Any, kv_plan: Any, max_tier: int) -> TieredKVCache:
        cache = TieredKVCache(engine.layout, kv_plan, self._rope(engine))
        cache.max_tier = max_tier
        return cache

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
            dropped = self.prefix_store.drop_above(self.controller.guard.max_tier)
            event["prefix_blocks_dropped"] = dropped
            event["warm_caches_dropped"] = self.warm.clear()

    def _rope(self, engine: Any) -> RopeTables | None:
        key = str(engine.folder.onnx_path)
        if key not in self._ropes:
            self._ropes[key] = RopeTables.from_onnx(engine.folder.onnx_path) if engine.has_position_ids else None
        return self._ropes[key]

    @staticmethod
    def _kv_format(engine: Any, plan: Any) -> str:
        return f"{engine.layout.dtype}|block{plan.block_size}|group{plan.group_size}"
