"""The design document's fallback manager: per-reason state and backoff, and notifications when they repeat.

| reason | detected by | action (``effective.py`` applies it) | backoff (initial, max, multiplier) | recovers |
|---|---|---|---|---|
| device_error | a fault of our engine on a non-CPU device | CPU + conservative KV | 5 s, 300 s, x2.0 | backoff elapsed |
| memory_pressure | psutil vs ``--memory-limit`` | window halved, thresholds -0.1, prefix budget halved | 1 s, 60 s, x1.8 | < 80% after the backoff |
| timeout | a generation without a token for ``watchdog_s`` (API no response) | baseline engine, engine rebuilt | 3 s, 180 s, x2.2 | backoff elapsed |
| backend_error | an exception from our engine | that request on the baseline engine, then baseline during the backoff | 1 s, 60 s, x2.0 | backoff elapsed |
| quality_degradation | the quality guard stepping back | its step (``guard.py``, which has its own backoff) | 2 s, 120 s, x1.5 | the guard relaxes |

Every activation is a ``fallback`` entry in the history. A reason seen ``thresholds[reason]`` times in
``window_s`` (5 minutes) writes a notification (severity ``warning``; ``critical`` once ``critical_count``
fallbacks of any reason fall in the window) with the recommended action to
``INFEROS_HOME/logs/fallback_notifications.log`` (JSON lines, rotated at ``max_log_bytes``) and the log.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lemonade_inferos.engine.session import available_providers
from lemonade_inferos.paths import inferos_home
from lemonade_inferos.config.settings import Notifications

log = logging.getLogger(__name__)

RECOMMENDED_ACTIONS = {
    "quality_degradation": "review the KV plan: a more conservative kv.mode or higher thresholds "
                           "(inferos eval ppl measures each)",
    "device_error": "update the device driver or run the hardware diagnostics",
    "memory_pressure": "add memory, lower --inferos-prefix-cache-mb, or use a smaller or int4 model",
    "timeout": "review watchdog_s and --request-timeout, or the machine's load",
    "backend_error": "read the server log for the engine's error; report it if it repeats",
}


@dataclass
class Backoff:
    """Exponential backoff with jitter (the design document's BackoffStrategy)."""

    initial_s: float
    max_s: float
    multiplier: float
    attempts: int = 0
    until: float = 0.0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * self.multiplier ** self.attempts)
        if self.attempts:
            delay *= 1.0 + self._rng.uniform(0.1, 0.3)
        self.attempts += 1
        self.until = time.time() + delay
        return delay

    @property
    def active(self) -> bool:
        return time.time() < self.until

    def reset(self) -> None:
        self.attempts, self.until = 0, 0.0


def default_backoffs() -> dict[str, Backoff]:
    return {"quality_degradation": Backoff(2.0, 120.0, 1.5), "device_error": Backoff(5.0, 300.0, 2.0),
            "memory_pressure": Backoff(1.0, 60.0, 1.8), "timeout": Backoff(3.0, 180.0, 2.2),
            "backend_error": Backoff(1.0, 60.0, 2.0)}


class NotificationLog:
    """Counts fallbacks in a sliding window and writes a notification when a reason repeats."""

    def __init__(self, settings: Notifications | None = None, path: Path | None = None) -> None:
        self.settings = settings or Notifications()
        self.path = path
        self._events: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()
        self.sent: deque[dict[str, Any]] = deque(maxlen=50)

    def record(self, reason: str, context: dict[str, Any]) -> dict[str, Any] | None:
        """Count one fallback; return the notification it triggers, if any."""
        now = time.time()
        with self._lock:
            self._events.append((now, reason))
            while self._events and now - self._events[0][0] > self.settings.window_s:
                self._events.popleft()
            count = sum(1 for _, r in self._events if r == reason)
            total = len(self._events)
        if count < self.settings.thresholds.get(reason, 3):
            return None
        critical = total >= self.settings.critical_count
        minutes = self.settings.window_s / 60
        notification = {"timestamp": now, "severity": "critical" if critical else "warning", "reason": reason,
                        "count": count, "fallbacks_in_window": total, "window_s": self.settings.window_s,
                        "message": f"fallbacks repeat: {reason} ({count} in {minutes:g} min"
                                   f"{f', {total} of any reason' if total != count else ''})",
                        "recommended_action": RECOMMENDED_ACTIONS.get(reason, "contact support"),
                        "context": context}
        self._write(notification)
        self.sent.append(notification)
        (log.critical if critical else log.warning)("%s; recommended: %s", notification["message"],
                                                    notification["recommended_action"])
        return notification

    def _write(self, notification: dict[str, Any]) -> None:
        path = self.path or inferos_home() / "logs" / "fallback_notifications.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size > self.settings.max_log_bytes:
                path.replace(path.with_name(path.name + ".1"))  # one older file kept: the log stays bounded
            with path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(notification, default=str) + "\n")
        except OSError:
            log.exception("could not write %s", path)


@dataclass
class Fallbacks:
    notify: Callable[[dict[str, Any]], None]
    notifications: NotificationLog = field(default_factory=NotificationLog)
    backoffs: dict[str, Backoff] = field(default_factory=default_backoffs)
    lost_devices: list[str] = field(default_factory=list)
    memory_pressure: bool = False
    consecutive_errors: int = 0
    baseline_reason: str | None = None

    # -- events --------------------------------------------------------------------------------------
    def fallback(self, reason: str, event: str, action: str, **context: Any) -> float:
        """Record one activation of ``reason``: its backoff, a history entry, maybe a notification."""
        delay = self.backoffs[reason].next_delay()
        self.notify({"kind": "fallback", "event": event, "reason": reason, "action": action,
                     "backoff_s": round(delay, 3), "attempt": self.backoffs[reason].attempts, **context})
        notification = self.notifications.record(reason, {"event": event, **context})
        if notification is not None:
            self.notify({"kind": "notification", **notification})
        return delay

    def check_memory(self, pressure: float) -> None:
        """Pressure above 80% activates; it recovers below 80% once its backoff has elapsed (no flapping)."""
        if not self.memory_pressure and pressure > 0.8:
            self.memory_pressure = True
            self.fallback("memory_pressure", "memory_pressure", "recent window halved, thresholds lowered by "
                          "0.1, prefix budget halved", pressure=round(pressure, 3))
        elif self.memory_pressure and pressure < 0.8 and not self.backoffs["memory_pressure"].active:
            self.memory_pressure = False
            self.backoffs["memory_pressure"].reset()
            self.notify({"kind": "fallback", "event": "memory_recovered", "reason": "memory_pressure",
                         "pressure": round(pressure, 3), "action": "normal compression and prefix budget"})

    def device_error(self, devices: list[str], error: str) -> None:
        lost = [d for d in devices if d != "cpu"]
        if not lost:
            return
        self.lost_devices = sorted(set(self.lost_devices) | set(lost))
        self.fallback("device_error", "device_lost", "CPU execution provider with conservative KV thresholds",
                      devices=lost, error=error[:300])

    def check_devices(self) -> None:
        """A lost device is tried again once its backoff has elapsed."""
        if self.lost_devices and not self.backoffs["device_error"].active:
            self.notify({"kind": "fallback", "event": "device_retry", "reason": "device_error",
                         "devices": self.lost_devices, "action": "the device is used again"})
            self.lost_devices = []

    def backend_error(self, error: str) -> None:
        self.consecutive_errors += 1
        delay = self.fallback("backend_error", "backend_error", "baseline mode for the backoff", error=error[:500],
                              consecutive_errors=self.consecutive_errors)
        self.baseline_reason = f"backend error ({self.consecutive_errors} in a row): baseline for {delay:.1f} s"

    def stalled(self, error: str) -> None:
        """A generation that stopped producing tokens (the fallback table's "API no response")."""
        delay = self.fallback("timeout", "generation_stalled", "baseline mode for the backoff; the engine is "
                              "rebuilt", error=error[:300])
        self.baseline_reason = f"a generation stalled: baseline for {delay:.1f} s"

    def quality_step(self, event: dict[str, Any]) -> None:
        """The guard stepped back (its own backoff paces it): counted toward notifications."""
        if event.get("to_level", 0) > event.get("from_level", 0):
            notification = self.notifications.record("quality_degradation", {"event": "guard_step", **event})
            if notification is not None:
                self.notify({"kind": "notification", **notification})

    def backend_ok(self) -> None:
        if self.consecutive_errors:
            self.notify({"kind": "fallback", "event": "backend_recovered", "after_errors": self.consecutive_errors})
        self.consecutive_errors = 0
        self.backoffs["backend_error"].reset()
        self.backoffs["timeout"].reset()

    # -- state -------------------------------------------------------------------------------------
    @property
    def in_backoff(self) -> bool:
        return self.backoffs["backend_error"].active or self.backoffs["timeout"].active

    @property
    def baseline_until(self) -> float:
        return max(self.backoffs["backend_error"].until, self.backoffs["timeout"].until)

    @baseline_until.setter
    def baseline_until(self, value: float) -> None:
        for reason in ("backend_error", "timeout"):
            self.backoffs[reason].until = value

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {"lost_devices": self.lost_devices, "memory_pressure": self.memory_pressure,
                "backend_backoff_s": max(0.0, self.baseline_until - now),
                "consecutive_backend_errors": self.consecutive_errors,
                "baseline_reason": self.baseline_reason if self.in_backoff else None,
                "backoff": {reason: {"attempts": b.attempts, "remaining_s": round(max(0.0, b.until - now), 3)}
                            for reason, b in self.backoffs.items()},
                "notifications": list(self.notifications.sent)[-5:],
                "notification_thresholds": self.notifications.settings.thresholds,
                "available_providers": sorted(available_providers())}
