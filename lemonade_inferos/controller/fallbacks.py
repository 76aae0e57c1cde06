"""The design document's fallback table, as state the controller consults before each run.

| event | detected by | immediate action | recovers when |
|---|---|---|---|
| requested provider missing | ``ort.get_available_providers()`` | CPU, conservative KV thresholds | provider present |
| memory pressure | psutil vs ``--memory-limit`` | window halved, thresholds -0.1, prefix budget halved | usage < 80% |
| backend error / timeout | an exception from our engine | that request on the baseline engine; baseline plans during an exponential backoff | backoff elapsed |

Every activation and recovery is a notification entry in the history.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lemonade_inferos.engine.session import DEVICE_TO_PROVIDER, available_providers

log = logging.getLogger(__name__)


@dataclass
class Fallbacks:
    notify: Callable[[dict[str, Any]], None]
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    device_missing: list[str] = field(default_factory=list)
    memory_pressure: bool = False
    consecutive_errors: int = 0
    baseline_until: float = 0.0
    _rng: random.Random = field(default_factory=random.Random)

    def check_devices(self, devices: list[str]) -> None:
        available = set(available_providers())
        missing = [d for d in devices if d != "cpu" and DEVICE_TO_PROVIDER[d] not in available]
        if missing != self.device_missing:
            event = "device_missing" if missing else "device_recovered"
            self.notify({"kind": "fallback", "event": event, "devices": missing or self.device_missing,
                         "action": "CPU execution provider with conservative KV thresholds" if missing else
                         "requested devices available again"})
            self.device_missing = missing

    def check_memory(self, pressure: float) -> None:
        active = pressure > 0.8 if not self.memory_pressure else pressure >= 0.8
        if active != self.memory_pressure:
            self.memory_pressure = active
            self.notify({"kind": "fallback", "event": "memory_pressure" if active else "memory_recovered",
                         "pressure": round(pressure, 3),
                         "action": "recent window halved, thresholds lowered by 0.1, prefix budget halved" if active
                         else "normal compression and prefix budget"})

    def backend_error(self, error: str) -> None:
        self.consecutive_errors += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.consecutive_errors - 1))
        delay *= 1.0 + 0.25 * self._rng.random()
        self.baseline_until = time.time() + delay
        self.notify({"kind": "fallback", "event": "backend_error", "error": error[:500],
                     "action": f"baseline mode for {delay:.1f} s", "consecutive_errors": self.consecutive_errors})

    def backend_ok(self) -> None:
        if self.consecutive_errors:
            self.notify({"kind": "fallback", "event": "backend_recovered", "after_errors": self.consecutive_errors})
        self.consecutive_errors = 0

    @property
    def in_backoff(self) -> bool:
        return time.time() < self.baseline_until

    def status(self) -> dict[str, Any]:
        return {"device_missing": self.device_missing, "memory_pressure": self.memory_pressure,
                "backend_backoff_s": max(0.0, self.baseline_until - time.time()),
                "consecutive_backend_errors": self.consecutive_errors}
