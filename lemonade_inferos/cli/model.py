"""``inferos model build|list`` and ``inferos generate``: model folders and a quick streamed reply."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.common import console, handle_errors


@click.group()
def model() -> None:
    """Build and list onnxruntime-genai model folders."""


@model.command("build")
@click.argument("name")
@click.option("--gguf", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A GGUF file of your own (Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3), built under NAME.")
@click.option("--weights", type=click.Choice(["fp32", "int4", "int8"]), default=None,
              help="Weight precision of the ONNX model [default: fp32 for a built-in model, int4 for --gguf]: "
                   "the GGUF's Q4_0/Q5_0/Q8_0/Q6_K tensors keep their own blocks, others are requantized to "
                   "these bits (see docs/models.md).")
@click.option("--kv", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="KV format: int8 builds ORT's native static per-channel INT8 KV variant.")
@click.option("--force", is_flag=True, help="Rebuild even when a verified build exists.")
@handle_errors
def model_build(name: str, gguf: str | None, weights: str | None, kv: str, force: bool) -> None:
    """Build NAME offline into the model cache: a built-in model (smollm2-135m, gemma3-270m) from its packaged GGUF,
    or your own GGUF file (--gguf) under the name NAME."""
    from pathlib import Path

    from lemonade_inferos.engine.build import BuildSpec, build_model

    spec = BuildSpec(name, weights or ("int4" if gguf else "fp32"), kv, gguf=str(Path(gguf).resolve()) if gguf else None)
    with console.status(f"building {spec.variant}") as status:
        path = build_model(spec, progress=lambda msg: (status.update(msg), console.log(msg)), force=force)
    _calibrate(path)
    click.echo(str(path))


def _calibrate(path) -> None:
    """The INT8 live KV scales, calibrated now with a progress bar (a server's first request then does not wait)."""
    from rich.progress import Progress

    from lemonade_inferos.engine.prepare import prepare_live_int8

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("calibrating INT8 live KV scales", total=None)
        said = prepare_live_int8(path, ["cpu"], lambda done, total: bar.update(task, completed=done, total=total))
    console.log(said)


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


@click.command()
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
