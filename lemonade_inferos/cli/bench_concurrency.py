"""``inferos bench concurrency``: many clients at once against our server one request after another and, where
given, llama-server (``bench/concurrency.py``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.bench_servers import peer_setup, server_setup_options
from lemonade_inferos.cli.common import console, handle_errors


@click.command("concurrency")
@click.option("--llama-server", "llama_server", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A llama-server binary to run the same clients against (4 slots, as Lemonade runs "
                                 "it); without one, our server against itself one request after another.")
@server_setup_options
@click.option("--clients", "counts", default="1,2,4,8", show_default=True, help="Client counts, comma-separated "
                                                                                "(of 1, 2, 4, 8).")
@click.option("--runs", default=1, show_default=True, help="Fresh-server runs per client count and server.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/concurrency.json"),
              show_default=True)
@handle_errors
def bench_concurrency_cmd(llama_server: Path | None, model_name: str, gguf: Path | None, counts: str, runs: int,
                          ctx_size: int, threads: int, busy_core: bool, our_options: tuple[str, ...],
                          json_path: Path) -> None:
    """1, 2, 4 and 8 clients at once, each a 4-turn chat (~180-token turns, 96-token replies): TTFT and request
    latency p50/p95 and aggregate tok/s of our server (--parallel 4), of our server one request after another
    (--parallel 1) and of llama-server where given, speculative decoding off on all; JSON and PNG."""
    from lemonade_inferos.bench.concurrency import METRICS, bench_concurrency
    from lemonade_inferos.bench.peer_workloads import CLIENT_COUNTS
    from lemonade_inferos.bench.peers import LLAMA, OURS, OURS_SERIAL

    try:
        wanted = [int(c) for c in counts.split(",")]
    except ValueError:
        raise click.UsageError(f"--clients takes comma-separated counts of {CLIENT_COUNTS}, got {counts!r}") from None
    if not wanted or set(wanted) - set(CLIENT_COUNTS):
        raise click.UsageError(f"--clients takes counts of {CLIENT_COUNTS}, got {counts!r}")
    setup, prompts = peer_setup(llama_server, model_name, gguf, ctx_size, threads, busy_core, our_options)
    with console.status("benchmarking") as status:
        results = bench_concurrency(setup, wanted, runs, prompts, json_path, progress=status.update)
    table = Table("clients", "server", *METRICS, "x serial TTFT p95", "x llama TTFT p95")
    for workload, entry in results["workloads"].items():
        for name in (OURS, OURS_SERIAL, LLAMA):
            peer = entry["peers"].get(name)
            if peer is None:
                continue
            cells = [f"{peer[m]['median']:.3g}" if peer.get(m) else "-" for m in METRICS]
            ratios = [f"{entry['ratios'].get(b, {}).get('ttft_p95_s', float('nan')):.2f}" if name == OURS else ""
                      for b in (OURS_SERIAL, LLAMA)]
            table.add_row(workload.replace("clients_", ""), name, *cells, *ratios)
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
