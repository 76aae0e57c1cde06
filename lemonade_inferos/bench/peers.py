"""``inferos bench peers``: our server against llama.cpp's ``llama-server``, the server upstream Lemonade runs for
its CPU users.

Both serve the same model: llama-server the GGUF it ships in, ours the ONNX folder built from that GGUF. Each
runs with its defaults as Lemonade's users get them (ours: ``lemonade-server serve --plugin inferos``; llama-server:
prompt cache on, 4 slots, f16 KV, flash attention auto), on the same context per request (``--ctx-size``; each of
llama-server's slots gets all of it: ``-c`` is ctx x slots, its KV allocated up front as llama.cpp does) and the same
thread count. For every run and workload (``peer_workloads.py``) each server is started fresh, one at a
time, the order alternating between runs; one short request loads the model, then the workload runs while the
server's RSS is sampled (peak RSS of the process, the model's load included). Medians and the spread over runs
are reported, and for each workload our headline metric and peak RSS as ratios to llama-server's in the same run
(below 1 is better for a time or memory, above 1 for a speed).

Variants a workload is also run under: ``decode_spec`` with speculative decoding on (ours: its default n-gram
drafting; llama-server: ``--spec-type ngram-simple``; plain ``decode`` has it off on both), ``sliding`` also
against llama-server with ``--cache-reuse 256`` (its KV shifting for a history whose prefix broke), the
``clients_N`` workloads (``inferos bench concurrency``) also against our own server with ``--parallel 1``.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from lemonade_inferos.bench.load import busy_core
from lemonade_inferos.bench.peer_workloads import CONTEXT, HEADLINE, WORKLOADS, Chat, PeerPrompts
from lemonade_inferos.bench.rss import PeakRssSampler
from lemonade_inferos.bench.servers import free_port, http_process
from lemonade_inferos.reports import plot_grouped_bars, write_json

OURS, LLAMA, LLAMA_REUSE = "inferos", "llama-server", "llama-server --cache-reuse 256"
OURS_SERIAL = "inferos --parallel 1"   # one request after another: the clients_N workloads' own baseline


@dataclass(frozen=True)
class Peer:
    """One server configuration: how to start it for a workload, and the model name it answers to."""

    name: str
    model: str
    workloads: tuple[str, ...]
    extra_args: dict[str, tuple[str, ...]] = field(default_factory=dict)   # per workload

    def command(self, port: int, workload: str, setup: "PeerSetup", state_dir: Path) -> tuple[list[str], str]:
        """The command line and the path that answers 200 once the server can take requests. ``state_dir``: an
        empty folder for what a server keeps across restarts (ours: the prefix store's disk spill), so a fresh
        server finds nothing an earlier run left."""
        extra = list(self.extra_args.get(workload, ()))
        ctx_size = max(setup.ctx_size, CONTEXT.get(workload, 0))
        if self.name in (OURS, OURS_SERIAL):
            import sys
            return ([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--port", str(port),
                     "--plugin", "inferos", "--ctx-size", str(ctx_size),
                     "--plugin-option", f"inferos.prefix_spill_dir={state_dir}", *setup.our_args, *extra], "/live")
        threads = ["-t", str(setup.threads), "-tb", str(setup.threads)] if setup.threads else []
        # every slot holds the context one request may use on ours (llama-server splits -c between its slots)
        return ([str(setup.llama_server), "-m", str(setup.gguf), "--host", "127.0.0.1", "--port", str(port),
                 "-c", str(ctx_size * setup.slots), "-np", str(setup.slots), "--no-webui", *threads, *extra],
                "/health")


@dataclass(frozen=True)
class PeerSetup:
    llama_server: Path | None        # None: our server alone (bench concurrency without a peer)
    gguf: Path
    model: str                       # our registry name
    ctx_size: int = 4096             # per request (Lemonade's default ctx_size)
    slots: int = 4                   # llama-server's parallel slots, each of ctx_size
    threads: int = 0                 # 0: each server's default (one per core)
    our_args: tuple[str, ...] = ()   # e.g. --plugin-option inferos.kv.live_format=model
    fp16_kv_bytes_per_token: int = 0  # the model's K and V at FP16 for one token (0: not known, no ratio)
    busy_core: bool = False          # another process keeps a core busy during every run (a desktop's browser)


def peers_for(setup: PeerSetup, workloads: list[str]) -> list[Peer]:
    off = ("--plugin-option", "inferos.speculative.mode=off")
    ours = Peer(OURS, setup.model, tuple(workloads),
                {w: off for w in workloads if w != "decode_spec" and w != "code_edit"})
    threads = tuple(arg for phase in ("prefill", "decode") for arg in
                    ("--plugin-option", f"inferos.scheduler.{phase}.intra_op_num_threads={setup.threads}"))
    if setup.threads:
        ours = Peer(OURS, setup.model, ours.workloads, {w: ours.extra_args.get(w, ()) + threads for w in workloads})
    llama = Peer(LLAMA, "gguf", tuple(workloads) if setup.llama_server else (),
                 {"decode_spec": ("--spec-type", "ngram-simple"), "code_edit": ("--spec-type", "ngram-simple")})
    reuse = Peer(LLAMA_REUSE, "gguf", tuple(w for w in llama.workloads if w == "sliding"),
                 {"sliding": ("--cache-reuse", "256")})
    many = tuple(w for w in workloads if w.startswith("clients_"))
    serial = Peer(OURS_SERIAL, setup.model, many, {w: ours.extra_args.get(w, ()) + ("--parallel", "1") for w in many})
    return [p for p in (ours, serial, llama, reuse) if p.workloads]


@contextlib.contextmanager
def _started(peer: Peer, workload: str, setup: PeerSetup, log_path: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="state-", dir=log_path.parent) as state_dir:
        cmd, ready = peer.command(port, workload, setup, Path(state_dir))
        with http_process(cmd, f"http://127.0.0.1:{port}", ready, log_path=log_path,
                          startup_timeout_s=600) as (base, proc):
            yield base, proc.pid


def run_once(peer: Peer, workload: str, setup: PeerSetup, prompts: PeerPrompts, log_path: Path) -> dict[str, Any]:
    """Start ``peer`` fresh, load its model with one short request, run ``workload`` while sampling its RSS (with
    ``setup.busy_core``, all of it while another process keeps a core busy)."""
    with busy_core() if setup.busy_core else contextlib.nullcontext(), \
            _started(peer, workload, setup, log_path) as (base, pid), \
            contextlib.closing(Chat(base, peer.model)) as chat:
        chat([{"role": "user", "content": "Hello"}], 2)
        with PeakRssSampler(interval_s=0.02, pid=pid) as rss:
            before_mb = rss.peak_mb
            metrics = WORKLOADS[workload](chat, prompts)
        metrics["peak_rss_mb"] = rss.peak_mb
        metrics["rss_growth_mb"] = rss.peak_mb - before_mb   # over what the loaded server held
        if setup.fp16_kv_bytes_per_token and metrics.get("prompt_tokens"):
            fp16_mb = setup.fp16_kv_bytes_per_token * metrics["prompt_tokens"] / 2**20
            metrics["rss_growth_vs_fp16_kv"] = metrics["rss_growth_mb"] / fp16_mb
        with contextlib.suppress(httpx.HTTPError):
            metrics["server"] = httpx.get(f"{base}/v1/models", timeout=5).json()
        return metrics


def run_peers(setup: PeerSetup, workloads: list[str], runs: int, prompts: PeerPrompts, log_dir: Path,
              progress=lambda message: None) -> dict[str, Any]:
    peers = peers_for(setup, workloads)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {w: {p.name: [] for p in peers if w in p.workloads}
                                                        for w in workloads}
    for run in range(runs):
        for workload in workloads:
            order = [p for p in peers if workload in p.workloads]
            for peer in (order if run % 2 == 0 else order[::-1]):  # alternating: neither always goes first
                progress(f"run {run + 1}/{runs}: {workload} on {peer.name}")
                log_path = log_dir / f"{workload}-{peer.name.replace(' ', '').replace('--', '-')}-{run + 1}.log"
                raw[workload][peer.name].append(run_once(peer, workload, setup, prompts, log_path))
    return summarize(setup, raw, runs)


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(setup: PeerSetup, raw: dict[str, dict[str, list[dict[str, Any]]]], runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "model": setup.model, "gguf": str(setup.gguf), "llama_server": str(setup.llama_server),
        "ctx_size": setup.ctx_size, "llama_slots": setup.slots, "threads": setup.threads or "default",
        "busy_core": setup.busy_core,
        "our_args": list(setup.our_args), "runs": runs,
        "commands": {p.name: p.command(0, "decode", setup, Path("STATE"))[0] for p in peers_for(setup, list(raw))},
        "workloads": {}}
    for workload, by_peer in raw.items():
        metric, lower_better = HEADLINE[workload]
        entry: dict[str, Any] = {"headline": metric, "lower_is_better": lower_better, "peers": {}}
        for name, records in by_peer.items():
            keys = [k for k in records[0] if isinstance(records[0][k], (int, float))]
            entry["peers"][name] = {k: _spread([r.get(k) for r in records]) for k in keys}
        ours, llama = entry["peers"].get(OURS), entry["peers"].get(LLAMA)
        if ours and llama and ours.get(metric) and llama.get(metric):
            entry["ratio_vs_llama"] = ours[metric]["median"] / llama[metric]["median"]
            entry["rss_ratio_vs_llama"] = ours["peak_rss_mb"]["median"] / llama["peak_rss_mb"]["median"]
        for name, key in ((LLAMA_REUSE, "ratio_vs_llama_cache_reuse"), (OURS_SERIAL, "ratio_vs_serial")):
            other = entry["peers"].get(name)
            if ours and other and other.get(metric):
                entry[key] = ours[metric]["median"] / other[metric]["median"]
        results["workloads"][workload] = entry
    return results


def plot_peers(results: dict[str, Any], path: Path) -> None:
    names = [w for w, e in results["workloads"].items() if "ratio_vs_llama" in e]
    series = {
        "time ratio (lower is better) / speed ratio (higher)": [results["workloads"][w]["ratio_vs_llama"]
                                                               for w in names],
        "peak RSS ratio": [results["workloads"][w]["rss_ratio_vs_llama"] for w in names],
    }
    plot_grouped_bars(path, names, series, "inferos / llama-server",
                      f"{results['model']} vs llama-server on its GGUF ({results['runs']} runs, medians)",
                      value_format="%.2f", size=(9, 4))


def bench_peers(setup: PeerSetup, workloads: list[str], runs: int, prompts: PeerPrompts, json_path: Path,
                progress=lambda message: None) -> dict[str, Any]:
    log_dir = json_path.parent / (json_path.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = run_peers(setup, workloads, runs, prompts, log_dir, progress)
    write_json(json_path, results)
    plot_peers(results, json_path.with_suffix(".png"))
    return results
