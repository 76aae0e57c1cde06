"""The embedded controller: owns the policy and turns it into what PreRun applies.

The plugin asks it for a KV plan and session options before every run and
reports measured InferenceStats after. (Metrics over time windows, the quality
guard, fallbacks and the control API build on this class.)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import psutil

from lemonade_inferos.controller.policy import Policy
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.kvcache.plan import KVPlan, plan_for_mode

log = logging.getLogger(__name__)

SCHEDULER_DEVICES = {"gpu_only": ["dml"], "npu_only": ["npu"]}


class Controller:
    def __init__(self, policy: Policy | None = None, memory_limit_bytes: int | None = None) -> None:
        self._policy = policy or Policy()
        self._lock = threading.Lock()
        self.policy_version = 1
        self.baseline = False
        self.memory_limit_bytes = memory_limit_bytes

    # -- policy ------------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    def update_policy(self, update: dict[str, Any]) -> Policy:
        """Merge a partial policy; invalid updates raise and change nothing."""
        with self._lock:
            new = self._policy.merged(update)
            self._policy = new
            self.policy_version += 1
        log.info("policy updated to version %d: %s", self.policy_version, update)
        return new

    def replace_policy(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy
            self.policy_version += 1

    def set_baseline(self, enable: bool) -> None:
        self.baseline = enable
        log.info("baseline mode %s", "on: every optimisation is off" if enable else "off")

    # -- what PreRun applies -------------------------------------------------------------------
    def memory_pressure(self) -> float:
        """Used memory over the limit (``--memory-limit``), else over physical memory; in [0, 1]."""
        if self.memory_limit_bytes:
            used = psutil.Process().memory_info().rss
            return min(1.0, used / self.memory_limit_bytes)
        return psutil.virtual_memory().percent / 100.0

    def kv_plan(self) -> KVPlan:
        kv = self._policy.kv
        thresholds = kv.level_thresholds
        plan = plan_for_mode(kv.mode, recent_window=kv.recent_window, l1_int8=thresholds.L1_int8,
                             l2_int4=thresholds.L2_int4, l3_evict=thresholds.L3_evict)
        return replace(plan, pressure=self.memory_pressure())

    def session_policy(self) -> SessionPolicy:
        scheduler, io = self._policy.scheduler, self._policy.io
        devices = SCHEDULER_DEVICES.get(scheduler.mode, [scheduler.prefill_device, scheduler.decode_device])
        ordered = list(dict.fromkeys([*devices, "cpu"]))
        return SessionPolicy(devices=ordered, enable_iobinding=io.enable_iobinding,
                             dml_pool_bytes=io.dml_pool_bytes if "dml" in ordered else None)
