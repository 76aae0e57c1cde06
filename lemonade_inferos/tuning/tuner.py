"""``inferos tune``: a coordinate search over the policy knobs that move speed, on the user's own workload.

It starts from the server's configured policy (measured first: the reference), then tries each value of one
knob at a time with the others at the best found so far, and keeps a value only when it beats the best by more
than ``min_gain`` (run-to-run scatter is a few per cent here) with its ΔPPL, from the server's quality
evaluation, inside ``max_delta_ppl``. It stops at ``max_trials``, or once ``target_tps`` is reached.
The result is never slower than the reference as measured in the same run: the reference wins unless beaten.
"""

from __future__ import annotations

from typing import Any, Callable

from lemonade_inferos.config.policy import deep_merge
from lemonade_inferos.tuning.trials import OBJECTIVES, Candidate, ServerControl, run_trial, score
from lemonade_inferos.tuning.workload import Workload

# (dotted field, values tried): the window and thresholds (through the KV mode), speculation, threads
DIMENSIONS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("kv.mode", ("dynamic", "latency_optimized", "throughput_optimized", "quality_optimized")),
    ("kv.recent_window", (32, 64, 128, 256)),
    ("speculative.mode", ("auto", "off")),
    ("speculative.num_draft_tokens", (4, 6, 8)),
    ("scheduler.decode.intra_op_num_threads", (0, 1, 2)),
)


def nested(field: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(field.split(".")):
        out = {key: out}
    return out


def value_at(policy: dict[str, Any], field: str) -> Any:
    for key in field.split("."):
        policy = policy[key]
    return policy


def tune(server: ServerControl, model: str, workload: Workload, objective: str = "tps",
         max_delta_ppl: float = 0.1, target_tps: float | None = None, max_trials: int = 12, repeats: int = 2,
         min_gain: float = 0.03, eval_context: int = 512, dimensions=DIMENSIONS,
         on_trial: Callable[[dict[str, Any]], None] = lambda t: None,
         progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    configured = server.policy()["configured"]
    _, _, best_of = OBJECTIVES[objective]
    better = (lambda a, b: a > b * (1 + min_gain)) if best_of is max else (lambda a, b: a < b * (1 - min_gain))

    def trial(name: str, update: dict[str, Any]) -> dict[str, Any]:
        result = run_trial(server, model, workload, Candidate(name, update), configured, repeats, eval_context,
                           progress)
        trials.append(result)
        on_trial(result)
        return result

    trials: list[dict[str, Any]] = []
    steps: list[str] = []
    best = trial("configured", {})
    reference = best
    steps.append(f"configured: {score(best, objective):.2f} ({objective}), ΔPPL {best['delta_ppl']:+.4f}")
    current: dict[str, Any] = {}
    stop = None
    for field, values in dimensions:
        for value in values:
            if value == value_at(deep_merge(configured, current), field):
                continue
            if len(trials) >= max_trials:
                stop = f"stopped after {max_trials} trials (--max-trials)"
                break
            if target_tps is not None and best["metrics"]["throughput"]["tokens_per_second"] >= target_tps:
                stop = f"target {target_tps:g} tok/s reached"
                break
            candidate = deep_merge(current, nested(field, value))
            result = trial(f"{field}={value}", candidate)
            inside = result["delta_ppl"] is not None and result["delta_ppl"] <= max_delta_ppl
            if inside and better(score(result, objective), score(best, objective)):
                steps.append(f"kept {field}={value}: {score(result, objective):.2f} vs {score(best, objective):.2f}"
                             f", ΔPPL {result['delta_ppl']:+.4f}")
                best, current = result, candidate
            else:
                steps.append(f"not kept {field}={value}: {score(result, objective):.2f}, ΔPPL "
                             f"{result['delta_ppl']:+.4f}" + ("" if inside else f" > {max_delta_ppl:g}"))
        if stop:
            break
    change = (score(best, objective) / score(reference, objective) - 1) * 100
    reason = ("the configured policy: no change beat it by more than "
              f"{min_gain:.0%} inside ΔPPL {max_delta_ppl:g}" if best is reference else
              f"{best['name']} and what was kept before it: {change:+.1f} % {objective} vs configured, ΔPPL "
              f"{best['delta_ppl']:+.4f} <= {max_delta_ppl:g}")
    return {"objective": objective, "max_delta_ppl": max_delta_ppl, "target_tps": target_tps,
            "chosen": {"update": current, "trial": best["name"], "reason": reason,
                       "metrics": best["metrics"], "delta_ppl": best["delta_ppl"]},
            "reference": {"metrics": reference["metrics"], "delta_ppl": reference["delta_ppl"]},
            "steps": steps, "stopped": stop, "trials": trials, "configured": configured}
