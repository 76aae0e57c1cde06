"""Running ``inferos bench report``: the servers, in order, each fresh; then the JSON, PNGs and HTML.

1. baseline: ``lemonade-server`` without the plugin (og.Generator);
2. inferos: ``--plugin inferos`` with its default policy;
3. the ablation (unless ``ablation=False``): one fresh plugin server per configuration, its policy set through
   the control API before the first request.
Replies are scored by the full-precision model afterwards, in this process, once the servers are gone (the
scoring must not share the cores with a measured run).
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from lemonade_inferos.bench.ablation import (CONFIGURATIONS, DESCRIPTIONS, active_features, policy_update, synergy,
                                             uses_cache)
from lemonade_inferos.bench.report import Report, ReportConfig, compare, mode_metrics, play_sets, reference_scores
from lemonade_inferos.bench.servers import server_process

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


@contextlib.contextmanager
def plugin_server(token: str, log_path: Path | None = None) -> Iterator[tuple[str, int, str]]:
    """A fresh ``--plugin inferos`` server (no disk spill: nothing from an earlier run is reused); yields its
    base URL, pid and control API URL."""
    env = {"INFEROS_RANDOM_PORT": "true", "INFEROS_AGENT_TOKEN": token}
    with server_process("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env=env,
                        log_path=log_path) as (base, proc):
        control = httpx.get(f"{base}/api/v1/health", timeout=30).json()["inferos"]["control_api"]["url"]
        yield base, proc.pid, control


def set_policy(control: str, token: str, update: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{control}/policy", json=update, headers={"X-Inferos-Token": token}, timeout=30)
    reply.raise_for_status()
    return httpx.get(f"{control}/policy", timeout=30).json()


def environment() -> dict[str, Any]:
    import onnxruntime

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_ablation(model: str, config: ReportConfig, token: str, progress: ProgressFactory,
                 log_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Each configuration on a fresh plugin server: its measured run (records, peak RSS), what ran, overrides."""
    runs = {}
    for name, features in CONFIGURATIONS.items():
        advance = progress(f"ablation {name}", config.requests(config.ablation_sets))
        with plugin_server(token, log_dir / f"ablation-{name}.log" if log_dir else None) as (base, pid, control):
            policy = set_policy(control, token, policy_update(features))
            run = play_sets(base, pid, model, config, config.ablation_sets, uses_cache(features), advance)
            run["active"] = active_features(httpx.get(f"{control}/metrics", timeout=30).json())
        runs[name] = {**run, "features": list(features), "overrides": policy["overrides"]}
    return runs


def ablation_summary(runs: dict[str, dict[str, Any]], sets: tuple[str, ...]) -> dict[str, Any]:
    """The configurations' metrics (once their replies are scored) and the synergy analysis."""
    results = {name: {**mode_metrics(run), "features": run["features"], "description": DESCRIPTIONS[name],
                      "active": run["active"], "overrides": run["overrides"]} for name, run in runs.items()}
    return {"configurations": results, "analysis": synergy(results), "sets": list(sets)}


def run_report(model: str, model_dir: Path, config: ReportConfig, progress: ProgressFactory,
               log_dir: Path | None = None) -> Report:
    token = secrets.token_urlsafe(24)
    env = environment()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    advance = progress("baseline (og.Generator)", config.requests())
    with server_process(log_path=log_dir / "baseline.log" if log_dir else None) as (base, proc):
        baseline = play_sets(base, proc.pid, model, config, progress=advance)
    advance = progress("inferos", config.requests())
    with plugin_server(token, log_dir / "inferos.log" if log_dir else None) as (base, pid, control):
        inferos = play_sets(base, pid, model, config, progress=advance)
        inferos["active"] = active_features(httpx.get(f"{control}/metrics", timeout=30).json())
    ablation_runs = run_ablation(model, config, token, progress, log_dir) if config.ablation else {}
    started = time.perf_counter()
    reference_scores(model_dir, baseline["records"] + inferos["records"]
                     + [r for run in ablation_runs.values() for r in run["records"]])
    ablation = ablation_summary(ablation_runs, config.ablation_sets) if ablation_runs else None
    env["scoring_s"] = time.perf_counter() - started
    report = compare(model, config, env, baseline, inferos, ablation)
    report.inferos["active"] = inferos["active"]
    return report
