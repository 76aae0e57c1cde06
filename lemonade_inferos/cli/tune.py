"""``inferos ab`` and ``inferos tune``: candidate policies measured on the running server with a workload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.common import console, handle_errors

server_option = click.option("--server", "server_url", default="http://127.0.0.1:13305", show_default=True,
                             envvar="LEMONADE_URL", help="The running lemonade-server --plugin inferos.")
workload_option = click.option("--workload", default="chat", show_default=True,
                               help="A prompt set (chat, conversation, reasoning, agent, rag) or a JSONL file the "
                                    "server recorded with --inferos-record FILE.")


def _common(fn):
    for option in reversed((
            server_option, workload_option,
            click.option("--model", default=None, help="Model to request [default: the one loaded]."),
            click.option("--repeats", default=2, show_default=True, type=click.IntRange(1, 50),
                         help="Measured replays of the workload per candidate (after one unmeasured)."),
            click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
                         help="max_tokens of prompt-set requests (recorded requests keep theirs)."),
            click.option("--objective", type=click.Choice(["tps", "ttft"]), default="tps", show_default=True),
            click.option("--max-delta-ppl", default=0.1, show_default=True, type=click.FloatRange(0, 2),
                         help="The quality budget: a candidate whose evaluated ΔPPL is above it is never chosen."),
            click.option("--eval-context", default=512, show_default=True, type=click.IntRange(64, 8192),
                         help="Corpus tokens of each candidate's quality evaluation."),
            click.option("--apply", is_flag=True, help="Leave the chosen policy applied (default: restore the "
                                                       "configured one)."),
            click.option("--json", "json_path", type=click.Path(path_type=Path), default=None))):
        fn = option(fn)
    return fn


def _progress(label: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    task = progress.add_task(label, total=total)
    return progress, lambda n: progress.advance(task, n)


def _table(trials: list[dict[str, Any]]) -> Table:
    table = Table("candidate", "tok/s", "TTFT mean ms", "TTFT p95 ms", "latency p95 ms", "ΔPPL")
    for t in trials:
        m = t["metrics"]
        table.add_row(t["name"], f"{m['throughput']['tokens_per_second']:.1f}",
                      f"{m['first_token_latency']['mean_ms']:.0f}", f"{m['first_token_latency']['p95_ms']:.0f}",
                      f"{m['latency']['p95_ms']:.0f}", f"{t['delta_ppl']:+.4f}")
    return table


def _finish(server: Any, configured: dict[str, Any], update: dict[str, Any] | None, apply: bool) -> str:
    from lemonade_inferos.config.policy import deep_merge

    if apply and update is not None:
        version = server.set_policy(deep_merge(configured, update))["version"]
        return f"applied (policy version {version})"
    server.set_policy(configured)
    return "the configured policy is restored" + (" (--apply leaves the choice applied)" if update else "")


@click.command("ab")
@click.option("--policy", "policies", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="A candidate policy file (repeatable): an infer_os config (configs/*.yaml) or a partial policy.")
@click.option("--no-reference", is_flag=True, help="Do not measure the configured policy as a candidate too.")
@_common
@handle_errors
def ab(policies: tuple[Path, ...], no_reference: bool, server_url: str, workload: str, model: str | None,
       repeats: int, max_tokens: int, objective: str, max_delta_ppl: float, eval_context: int, apply: bool,
       json_path: Path | None) -> None:
    """A/B test policies on the running server: same workload, same statistics, the best inside the ΔPPL budget."""
    from lemonade_inferos.reports import write_json
    from lemonade_inferos.tuning.trials import Candidate, ServerControl, choose, load_candidate, run_trial
    from lemonade_inferos.tuning.workload import load_workload

    server = ServerControl(server_url)
    load = load_workload(workload, max_tokens)
    candidates = ([] if no_reference else [Candidate("configured")]) + [load_candidate(p) for p in policies]
    model = model or server.model or "SmolLM2-135M-Instruct-CPU"
    configured = server.policy()["configured"]
    progress, advance = _progress(f"{len(candidates)} candidates", len(candidates) * (repeats + 1) * load.requests())
    trials, winner = [], None
    try:
        with progress:
            for candidate in candidates:
                trials.append(run_trial(server, model, load, candidate, configured, repeats, eval_context, advance))
        winner, why = choose(trials, objective, max_delta_ppl, None if no_reference else "configured")
    finally:  # an interrupted run leaves the configured policy, never a half-measured candidate
        outcome = _finish(server, configured, winner["update"] if winner else None, apply)
    Console().print(_table(trials))
    Console().print(f"chosen: {why}; {outcome}")
    if json_path:
        write_json(json_path, {"workload": workload, "objective": objective, "max_delta_ppl": max_delta_ppl,
                               "chosen": winner["name"] if winner else None, "reason": why, "trials": trials})


@click.command("tune")
@click.option("--target-tps", type=float, default=None, help="Stop once a candidate reaches this throughput.")
@click.option("--max-trials", default=12, show_default=True, type=click.IntRange(1, 200))
@click.option("--min-gain", default=0.03, show_default=True, type=click.FloatRange(0, 1),
              help="A change is kept only when it beats the best so far by more than this share.")
@_common
@handle_errors
def tune(target_tps: float | None, max_trials: int, min_gain: float, server_url: str, workload: str,
         model: str | None, repeats: int, max_tokens: int, objective: str, max_delta_ppl: float, eval_context: int,
         apply: bool, json_path: Path | None) -> None:
    """Search window, thresholds (KV mode), speculation and threads on the running server for the workload."""
    from lemonade_inferos.reports import write_json
    from lemonade_inferos.tuning.trials import ServerControl
    from lemonade_inferos.tuning.tuner import tune as run_tune
    from lemonade_inferos.tuning.workload import load_workload

    server = ServerControl(server_url)
    load = load_workload(workload, max_tokens)
    model = model or server.model or "SmolLM2-135M-Instruct-CPU"
    configured = server.policy()["configured"]
    progress, advance = _progress(f"tuning (at most {max_trials} trials)", max_trials * (repeats + 1) * load.requests())
    result = None
    try:
        with progress:
            result = run_tune(server, model, load, objective, max_delta_ppl, target_tps, max_trials, repeats,
                              min_gain, eval_context, progress=advance,
                              on_trial=lambda t: console.log(f"{t['name']}: "
                                                             f"{t['metrics']['throughput']['tokens_per_second']:.1f} "
                                                             f"tok/s, ΔPPL {t['delta_ppl']:+.4f}"))
    finally:
        outcome = _finish(server, configured, result["chosen"]["update"] if result else None, apply)
    Console().print(_table(result["trials"]))
    for step in result["steps"]:
        Console().print(f"  {step}")
    Console().print(f"chosen: {result['chosen']['reason']}; {outcome}")
    if json_path:
        write_json(json_path, {"workload": workload, **result})
