"""The quality scheduler: when the next full and light evaluations are due (the design document: a full one daily
at 06:00, a light one every 4 hours). The controller's slow loop asks :meth:`EvaluationSchedule.due` and runs
what is due through its evaluation runner (``inferos eval ppl`` of the active plan, on the loaded engine, between
requests)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Callable

from lemonade_inferos.config.settings import QualitySchedule


def next_daily(at: str, after: float) -> float:
    """The first local time ``HH:MM`` strictly after ``after`` (a Unix time)."""
    hour, minute = map(int, at.split(":"))
    moment = datetime.fromtimestamp(after).replace(hour=hour, minute=minute, second=0, microsecond=0)
    if moment.timestamp() <= after:
        moment += timedelta(days=1)
    return moment.timestamp()


class EvaluationSchedule:
    def __init__(self, settings: QualitySchedule, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.next: dict[str, float | None] = {}
        self.configure(settings)

    def configure(self, settings: QualitySchedule) -> None:
        """(Re)plan from now: a reload that changes the schedule moves the next runs."""
        now = self.clock()
        self.settings = settings
        self.next = {"full": next_daily(settings.full_at, now) if settings.full_at else None,
                     "light": now + settings.light_every_h * 3600 if settings.light_every_h > 0 else None}

    def due(self) -> list[tuple[str, int]]:
        """The evaluations due now, as (kind, context tokens); each is planned again past now."""
        now, out = self.clock(), []
        for kind, when in self.next.items():
            if when is not None and when <= now:
                out.append((kind, self.settings.full_context if kind == "full" else self.settings.light_context))
                self.next[kind] = (next_daily(self.settings.full_at, now) if kind == "full"
                                   else now + self.settings.light_every_h * 3600)
        return out
