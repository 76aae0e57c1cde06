"""``inferos bench concurrency``: 1, 2, 4 and 8 clients at once, each a 4-turn chat of its own under one system
prompt (the ``clients_N`` workloads of ``peer_workloads.py``), on our server as users run it (``--parallel 4``: the
sequences' steps take turns), on our server one request after another (``--parallel 1``, the same run's baseline)
and, where given, on llama-server (4 slots, batched). Per server and client count: TTFT and request latency p50/p95
and aggregate tok/s; the ratios are ours over each baseline's (``peers.py`` runs the servers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lemonade_inferos.bench.peer_workloads import PeerPrompts
from lemonade_inferos.bench.peers import LLAMA, OURS, OURS_SERIAL, PeerSetup, run_peers
from lemonade_inferos.reports import plot_grouped_bars, write_json

METRICS = ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s", "total_tps")


def bench_concurrency(setup: PeerSetup, counts: list[int], runs: int, prompts: PeerPrompts, json_path: Path,
                      progress=lambda message: None) -> dict[str, Any]:
    log_dir = json_path.parent / (json_path.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = run_peers(setup, [f"clients_{n}" for n in counts], runs, prompts, log_dir, progress)
    for entry in results["workloads"].values():
        entry["ratios"] = ratios(entry["peers"])
    write_json(json_path, results)
    plot_concurrency(results, json_path.with_suffix(".png"))
    return results


def ratios(peers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every metric of ours over the same metric of each baseline (medians over runs)."""
    ours = peers.get(OURS) or {}
    out: dict[str, dict[str, float]] = {}
    for baseline in (OURS_SERIAL, LLAMA):
        theirs = peers.get(baseline) or {}
        out[baseline] = {m: ours[m]["median"] / theirs[m]["median"] for m in METRICS
                         if ours.get(m) and theirs.get(m) and theirs[m]["median"]}
    return {k: v for k, v in out.items() if v}


def plot_concurrency(results: dict[str, Any], path: Path) -> None:
    """TTFT p95 per client count, one bar per server."""
    workloads = list(results["workloads"])
    names = [n for n in (OURS, OURS_SERIAL, LLAMA) if any(n in results["workloads"][w]["peers"] for w in workloads)]
    series = {name: [((results["workloads"][w]["peers"].get(name) or {}).get("ttft_p95_s") or {}).get("median", 0.0)
                     for w in workloads] for name in names}
    plot_grouped_bars(path, [w.replace("clients_", "") + " clients" for w in workloads], series, "TTFT p95 (s)",
                      f"{results['model']}: clients at once, each a 4-turn chat ({results['runs']} runs, medians)",
                      value_format="%.2f", size=(9, 4))
