"""The inferos plugin: PreRun asks the embedded controller for a plan and restores cached prefixes;
PostRun reports what was measured and parks the KV blocks for the next turn.

Registered through the ``lemonade_server.plugins`` entry point (name ``inferos``),
like any third-party plugin.
"""

from __future__ import annotations

import logging
from typing import Any

from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.host.context import InferenceContext, RunPlan
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.prefix_store import PrefixStore
from lemonade_inferos.kvcache.rope import RopeTables

log = logging.getLogger(__name__)

DEFAULT_CONFIG = {"kv_mode": "dynamic", "recent_window": 64, "prefix_cache_mb": 256, "control_port": 7031,
                  "memory_limit": None, "config": None, "control_api": True}


class InferosPlugin:
    """Hook implementations plus the state they share: the controller and the prefix store."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = {**DEFAULT_CONFIG, **{k: v for k, v in (config or {}).items() if v is not None}}
        self.controller = Controller()
        self.controller.update_policy({"kv": {"mode": self.config["kv_mode"],
                                              "recent_window": int(self.config["recent_window"])}})
        self.prefix_store = PrefixStore(int(float(self.config["prefix_cache_mb"]) * 2**20))
        self._ropes: dict[str, RopeTables | None] = {}

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def host_startup(self, host: Any) -> None:
        log.info("inferos plugin active: kv mode %s, prefix cache %.0f MiB", self.controller.policy.kv.mode,
                 self.prefix_store.budget_bytes / 2**20)

    @hookimpl
    def host_shutdown(self, host: Any) -> None:
        log.info("inferos plugin stopping; prefix store %s", self.prefix_store.stats())

    @hookimpl
    def pre_run(self, context: InferenceContext) -> RunPlan:
        controller = self.controller
        if controller.baseline:
            return RunPlan(baseline=True, policy_version=controller.policy_version)
        kv_plan = controller.kv_plan()
        prompt = context.prompt_ids

        def make_cache(engine: Any) -> TieredKVCache:
            cache = TieredKVCache(engine.layout, kv_plan, self._rope(engine))
            cache.prefix_salt = PrefixStore.salt(engine.folder.fingerprint, self._kv_format(engine, kv_plan))
            blocks = self.prefix_store.lookup(prompt, cache.prefix_salt)
            self.prefix_store.restore(cache, blocks)
            return cache

        return RunPlan(session=controller.session_policy(), kv_plan=kv_plan, make_cache=make_cache,
                       policy_version=controller.policy_version)

    @hookimpl
    def post_run(self, context: InferenceContext, plan: RunPlan | None, stats: Any, cache: Any) -> None:
        if isinstance(cache, TieredKVCache) and stats.error is None:
            self.prefix_store.park(cache, cache.prefix_salt)

    # -- helpers -----------------------------------------------------------------------------------
    def _rope(self, engine: Any) -> RopeTables | None:
        key = str(engine.folder.onnx_path)
        if key not in self._ropes:
            self._ropes[key] = RopeTables.from_onnx(engine.folder.onnx_path) if engine.has_position_ids else None
        return self._ropes[key]

    @staticmethod
    def _kv_format(engine: Any, plan: Any) -> str:
        return f"{engine.layout.dtype}|block{plan.block_size}|group{plan.group_size}"
