"""One trial: a candidate policy applied to the running server, the workload replayed and measured, its ΔPPL
evaluated by the server's own quality evaluation (``POST /v1/evaluate``: the active plan scored against full
precision on the corpus), and the choice among trials inside a quality budget.

Each candidate is the server's configured policy at the start with the candidate's changes merged in, sent whole,
so one candidate never inherits another's changes. Each trial replays the workload once unmeasured first: every
candidate then meets caches as warm as the others did.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from lemonade_inferos.bench.report import summarize
from lemonade_inferos.controller.auth import TOKEN_ENV, read_token_file, token_file
from lemonade_inferos.config.files import ConfigError, parse_document
from lemonade_inferos.config.policy import Policy, deep_merge
from lemonade_inferos.errors import InferosError
from lemonade_inferos.tuning.workload import Workload, replay

Progress = Callable[[int], None]
OBJECTIVES = {"tps": ("throughput", "tokens_per_second", max), "ttft": ("first_token_latency", "mean_ms", min)}


class TrialError(InferosError):
    code = "trial_failed"


@dataclass(frozen=True)
class Candidate:
    """A named partial policy (what it changes from the server's configured policy)."""

    name: str
    update: dict[str, Any] = field(default_factory=dict)


def load_candidate(path: Path) -> Candidate:
    """A policy file: the design document's config (``infer_os:`` root, YAML or TOML, as in ``configs/``) or a
    partial policy mapping; validated before anything is sent."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        update = parse_document(text, str(path))
    except ConfigError:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise TrialError(f"{path}: neither an infer_os config nor a policy mapping") from None
        update = data
    update.pop("loops", None)
    try:
        Policy().merged(update)
    except Exception as exc:
        raise TrialError(f"{path}: not a valid policy: {exc}") from exc
    return Candidate(path.stem, update)


class ServerControl:
    """The running server and its control API (the token from ``INFEROS_AGENT_TOKEN`` or the token file)."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        try:
            health = httpx.get(f"{self.base}/api/v1/health", timeout=10).json()
        except httpx.HTTPError as exc:
            raise TrialError(f"no server at {self.base}: {exc} (start `lemonade-server serve --plugin inferos`)") \
                from exc
        api = (health.get("inferos") or {}).get("control_api") or {}
        if not api.get("url"):
            raise TrialError(f"{self.base} runs without the inferos plugin's control API: nothing to tune")
        self.control = api["url"]
        self.model = health.get("model_loaded")
        self.token = token or os.environ.get(TOKEN_ENV) or read_token_file(token_file())
        if not self.token:
            raise TrialError(f"no control token: set {TOKEN_ENV} or run where {token_file()} is readable")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = httpx.post(f"{self.control}{path}", json=body, headers={"X-Inferos-Token": self.token}, timeout=60)
        if reply.status_code >= 400:
            error = reply.json().get("error", {})
            raise TrialError(f"{path}: {reply.status_code} {error.get('code')}: {error.get('message')}")
        return reply.json()

    def policy(self) -> dict[str, Any]:
        return httpx.get(f"{self.control}/policy", timeout=30).json()

    def set_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        return self._post("/policy", policy)

    def evaluate(self, context: int, timeout_s: float = 600.0) -> dict[str, Any]:
        """Run the server's full quality evaluation of its active plan and wait for its result."""
        before = self._evaluation().get("last_run")
        self._post("/evaluate", {"context": context})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self._evaluation()
            if result.get("status") not in ("scheduled", "running") and result.get("last_run") != before:
                if result.get("status") == "failed":
                    raise TrialError(f"the quality evaluation failed: {result.get('error')}")
                return result
            time.sleep(0.5)
        raise TrialError(f"the quality evaluation did not finish in {timeout_s:.0f} s")

    def _evaluation(self) -> dict[str, Any]:
        return httpx.get(f"{self.control}/metrics", timeout=30).json()["quality"]["full_evaluation"]


def run_trial(server: ServerControl, model: str, workload: Workload, candidate: Candidate,
              configured: dict[str, Any], repeats: int = 2, eval_context: int = 512,
              progress: Progress = lambda n: None) -> dict[str, Any]:
    applied = server.set_policy(deep_merge(configured, candidate.update))
    replay(server.base, model, workload, progress)  # unmeasured: caches as warm as for every other candidate
    records = [r for _ in range(repeats) for r in replay(server.base, model, workload, progress)]
    evaluation = server.evaluate(eval_context)
    return {"name": candidate.name, "update": candidate.update, "policy_version": applied["version"],
            "metrics": summarize(records), "delta_ppl": evaluation["delta_ppl"], "evaluation": evaluation}


def score(trial: dict[str, Any], objective: str) -> float:
    group, key, _ = OBJECTIVES[objective]
    return trial["metrics"][group][key]


def choose(trials: list[dict[str, Any]], objective: str, max_delta_ppl: float,
           reference: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """The best trial inside the quality budget, and why (against ``reference``, the first trial by default)."""
    _, _, best_of = OBJECTIVES[objective]
    inside = [t for t in trials if t["delta_ppl"] is not None and t["delta_ppl"] <= max_delta_ppl]
    if not inside:
        return None, f"no candidate kept ΔPPL <= {max_delta_ppl:g}"
    winner = best_of(inside, key=lambda t: score(t, objective))
    ref = next((t for t in trials if t["name"] == reference), trials[0])
    unit = "tok/s" if objective == "tps" else "ms TTFT"
    change = (score(winner, objective) / score(ref, objective) - 1) * 100
    outside = [t["name"] for t in trials if t not in inside]
    why = (f"{winner['name']}: {score(winner, objective):.1f} {unit} ({change:+.1f} % vs {ref['name']}), "
           f"ΔPPL {winner['delta_ppl']:+.4f} <= {max_delta_ppl:g}")
    return winner, why + (f"; over the budget: {', '.join(outside)}" if outside else "")
