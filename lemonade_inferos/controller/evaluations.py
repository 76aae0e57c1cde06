"""The quality scheduler's evaluations: a full and a light ``inferos eval ppl`` of the active plan, in the
background, each with its status document (``/v1/metrics`` ``quality.full_evaluation`` / ``light_evaluation``).

The run itself belongs to the controller's owner (the plugin has the loaded engines); without an owner nothing
is scheduled and asking for a full evaluation is an error.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from lemonade_inferos.controller.schedule import EvaluationSchedule
from lemonade_inferos.metrics.document import iso

Runner = Callable[[int], dict[str, Any]]


class Evaluations:
    def __init__(self, schedule: EvaluationSchedule, runner: Runner | None, max_delta_ppl: Callable[[], float],
                 notify: Callable[[dict[str, Any]], None]) -> None:
        self.schedule = schedule
        self._runner = runner
        self._max_delta_ppl = max_delta_ppl
        self._notify = notify
        self._documents: dict[str, dict[str, Any]] = {"full": {"status": "never_run"},
                                                      "light": {"status": "never_run"}}

    def state(self, kind: str) -> dict[str, Any]:
        """The evaluation's last status, without its next time."""
        return self._documents[kind]

    def document(self, kind: str) -> dict[str, Any]:
        return {**self._documents[kind], "next_scheduled": iso(self.schedule.next.get(kind))}

    def run_due(self) -> None:
        """The slow loop: the evaluations due now, each in the background."""
        for kind, context in self.schedule.due():
            if self._runner is None:
                return
            self.start(kind, context, 0.0)

    def start(self, kind: str, context: int, delay_s: float) -> dict[str, Any]:
        """Start ``kind`` after ``delay_s`` unless it is already scheduled or running; its document now."""
        if self._runner is None:
            raise RuntimeError("no evaluation runner: the inferos plugin is not loaded")
        current = self._documents[kind]
        if current.get("status") in ("scheduled", "running"):
            return current
        self._documents[kind] = {**current, "status": "scheduled", "context": context,
                                 "started_for": iso(time.time() + delay_s)}
        threading.Thread(target=self._run, args=(kind, context, delay_s), name=f"inferos-{kind}-eval",
                         daemon=True).start()
        return self.document(kind)

    def _run(self, kind: str, context: int, delay_s: float) -> None:
        time.sleep(delay_s)
        self._documents[kind] = {**self._documents[kind], "status": "running"}
        try:
            result = self._runner(context)
        except Exception as exc:
            self._documents[kind] = {"status": "failed", "error": repr(exc), "last_run": iso(time.time())}
            return
        within = result["delta_ppl"] <= self._max_delta_ppl()
        self._documents[kind] = {
            "status": "within_threshold" if within else "over_threshold", "last_run": iso(time.time()),
            "dataset": f"pydoc_data.topics, {context} tokens", "baseline_ppl": result["ppl_fp"],
            "current_ppl": result["ppl"], "delta_ppl": result["delta_ppl"], "kld": result["kld"],
            "top1": result["top1"], "plan": result["plan"]}
        self._notify({"kind": f"{kind}_evaluation", **self.document(kind)})
