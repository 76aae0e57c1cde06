"""The quality guard: an online ΔPPL estimate and the step-back state machine it drives.

Samples come from shadow passes (``shadow.py``): the tail of a finished
sequence is re-scored under the active KV plan and under full precision, with
chunks no longer than the recent window. Every ``window_size`` samples make a
window; when a window's ΔPPL exceeds ``quality.max_delta_ppl`` for
``trip_windows`` consecutive windows the guard steps back one level, after a
backoff with jitter:

    level 0: the policy's plan        level 2: no quantization (evicting still allowed)
    level 1: no INT4 demotion          level 3: full precision cache (no quantization, no eviction)

It relaxes one level only after ``quiet_s`` without a bad window. Every
transition is reported through ``on_transition`` (history and log).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0

log = logging.getLogger(__name__)

LEVEL_MAX_TIER = {0: TIER_INT4, 1: TIER_INT8, 2: TIER_L0, 3: TIER_L0}
LEVEL_NAMES = {0: "policy plan", 1: "no INT4", 2: "no quantization", 3: "full precision"}


@dataclass
class ShadowSample:
    nll_plan: float
    nll_fp: float
    tokens: int
    timestamp: float = field(default_factory=time.time)


class QualityGuard:
    def __init__(self, limit: Callable[[], float], on_transition: Callable[[dict[str, Any]], None],
                 window_size: int = 4, trip_windows: int = 2, quiet_s: float = 600.0,
                 backoff_s: float = 5.0, max_backoff_s: float = 300.0, rng: random.Random | None = None) -> None:
        self.limit = limit
        self.on_transition = on_transition
        self.window_size = window_size
        self.trip_windows = trip_windows
        self.quiet_s = quiet_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.level = 0
        self._rng = rng or random.Random()
        self._samples: deque[ShadowSample] = deque(maxlen=256)
        self._pending: list[ShadowSample] = []
        self._bad_windows = 0
        self._trips = 0
        self._next_step_at = 0.0
        self._last_bad_at = 0.0
        self._last_change_at = time.time()
        self.last_window: dict[str, Any] | None = None

    @property
    def max_tier(self) -> int:
        return LEVEL_MAX_TIER[self.level]

    @property
    def evictions_allowed(self) -> bool:
        return self.level < 3

    def add(self, sample: ShadowSample) -> None:
        self._samples.append(sample)
        self._pending.append(sample)
        if len(self._pending) >= self.window_size:
            window, self._pending = self._pending, []
            self._evaluate(window)
        else:
            self._maybe_relax()

    def _evaluate(self, window: list[ShadowSample]) -> None:
        tokens = sum(s.tokens for s in window)
        nll_plan = sum(s.nll_plan * s.tokens for s in window) / tokens
        nll_fp = sum(s.nll_fp * s.tokens for s in window) / tokens
        delta_ppl = float(np.exp(nll_plan) - np.exp(nll_fp))
        now = time.time()
        self.last_window = {"delta_ppl": delta_ppl, "ppl_plan": float(np.exp(nll_plan)),
                            "ppl_fp": float(np.exp(nll_fp)), "samples": len(window), "tokens": tokens,
                            "limit": self.limit(), "at": now}
        if delta_ppl > self.limit():
            self._bad_windows += 1
            self._last_bad_at = now
            if self._bad_windows >= self.trip_windows and now >= self._next_step_at and self.level < 3:
                self._step(+1, f"ΔPPL {delta_ppl:.3f} > {self.limit():.3f} for {self._bad_windows} windows")
        else:
            self._bad_windows = 0
            self._maybe_relax()

    def _maybe_relax(self) -> None:
        now = time.time()
        if self.level > 0 and now - self._last_bad_at >= self.quiet_s and now >= self._next_step_at:
            self._step(-1, f"quiet for {now - self._last_bad_at:.0f} s")

    def _step(self, direction: int, reason: str) -> None:
        old = self.level
        self.level = max(0, min(3, self.level + direction))
        self._bad_windows = 0
        if direction > 0:
            self._trips += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, self._trips - 1))
        self._next_step_at = time.time() + delay * (1.0 + 0.25 * self._rng.random())  # jitter
        self._last_change_at = time.time()
        event = {"kind": "guard", "from_level": old, "to_level": self.level, "action": LEVEL_NAMES[self.level],
                 "reason": reason, "next_step_not_before_s": round(self._next_step_at - time.time(), 3),
                 "window": self.last_window}
        log.warning("quality guard: level %d -> %d (%s): %s", old, self.level, LEVEL_NAMES[self.level], reason)
        self.on_transition(event)

    def estimate(self) -> dict[str, Any]:
        """The online estimate over every retained sample (the metrics document's ``delta_ppl_est``)."""
        samples = list(self._samples)
        if not samples:
            return {"current": None, "baseline": None, "delta": None,
                    "measurement": {"method": "shadow pass: sampled requests re-scored under the active plan and "
                                              "full precision", "window_size": self.window_size, "samples": 0}}
        tokens = sum(s.tokens for s in samples)
        nll_plan = sum(s.nll_plan * s.tokens for s in samples) / tokens
        nll_fp = sum(s.nll_fp * s.tokens for s in samples) / tokens
        ppl_plan, ppl_fp = float(np.exp(nll_plan)), float(np.exp(nll_fp))
        return {"current": ppl_plan - ppl_fp, "baseline": ppl_fp, "ppl_plan": ppl_plan, "delta": ppl_plan - ppl_fp,
                "delta_nll": nll_plan - nll_fp,
                "measurement": {"method": "shadow pass: sampled requests re-scored under the active plan and full "
                                          "precision (chunks no longer than the recent window)",
                                "window_size": self.window_size, "samples": len(samples), "tokens": tokens,
                                "last_sample": samples[-1].timestamp}}

    def status(self) -> dict[str, Any]:
        return {"level": self.level, "action": LEVEL_NAMES[self.level], "max_tier": self.max_tier,
                "consecutive_bad_windows": self._bad_windows, "trips": self._trips, "last_window": self.last_window,
                "quiet_s": self.quiet_s}
