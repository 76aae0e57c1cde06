"""``inferos eval ppl|long``: quality of KV plans on CPython's pydoc_data.topics."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.common import console, handle_errors
from lemonade_inferos.cli.llamacpp_options import gguf_for_llamacpp, llamacpp_options


@click.group("eval")
def eval_group() -> None:
    """Quality of KV plans on CPython's pydoc_data.topics text (JSON plus a PNG)."""


@eval_group.command("ppl")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--kv", "plans", multiple=True, help="KV plan (repeatable): fp, int8, int4, int4-g64, dynamic, streaming, "
              "a kv.mode, with @PRESSURE (dynamic@0.9); the prefix live8: runs it on the INT8 live form "
              "(live8:dynamic, the server's default); blocks are ranked by attention as the server does, or by "
              "-keynorm/-recency/-inverse (ablations). Default: all five named plans.")
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
    from lemonade_inferos.eval.ppl import DEFAULT_PLANS, eval_ppl, write_report
    from lemonade_inferos.kvcache.plan import needs_attention_probe

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
    from lemonade_inferos.corpus import corpus_ids

    gguf = gguf_for_llamacpp(wanted, gguf, "smollm2-135m")
    if gguf is None:
        return []
    console.log(f"llama.cpp rows on {gguf.name} (f16, q8_0, q4_0 KV)")
    return llamacpp.eval_llamacpp(gguf, corpus_ids(engine.tokenizer, context + 1), engine.layout, chunk=window)


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

    from lemonade_inferos.reports import write_json
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.eval.ppl import eval_long_context
    from lemonade_inferos.kvcache.plan import needs_attention_probe

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder, SessionPolicy(attention_probe=needs_attention_probe([plan])))
    far = (min(8192, tokens // 3 * 2), tokens)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        result = eval_long_context(engine, plan, tokens, far=far,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_json(json_path, result)
    Console().print(result)


@eval_group.command("segments")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True)
@click.option("--kv", "plan", default="int8", show_default=True, help="KV plan the caches run under.")
@click.option("--recompute", "shares", multiple=True, type=click.FloatRange(0.0, 1.0),
              help="kv.segment_recompute shares (repeatable) [default: 0, 0.05, 0.25]")
@click.option("--samples", default=8, show_default=True, help="Sliding-history samples cut from the corpus.")
@click.option("--live-format", type=click.Choice(["int8", "model"]), default="int8", show_default=True,
              help="the working buffer's form (the server's default is int8)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/segments.json"),
              show_default=True)
@handle_errors
def eval_segments_cmd(model_name: str, plan: str, shares: tuple[float, ...], samples: int, live_format: str,
                      json_path: Path) -> None:
    """Segment reuse over the corpus: S+A+B+C kept warm, S+B+C+D served from it; KLD, top-1 and ΔPPL on D."""
    from rich.progress import Progress

    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy
    from lemonade_inferos.eval.segments import eval_segment_reuse
    from lemonade_inferos.reports import write_json

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder, SessionPolicy(kv_cache=live_format))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=samples)
        result = eval_segment_reuse(engine, plan, list(shares or (0.0, 0.05, 0.25)), samples, live_format,
                                    progress=lambda done, total: bar.update(task, completed=done))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, result)
    table = Table("recompute", "segment tokens", "recomputed", "KLD mean", "KLD max", "top-1", "PPL cold", "ΔPPL")
    for share, row in result["shares"].items():
        table.add_row(share, f"{row['segment_tokens']:.0f}", f"{row['recomputed']:.0f}", f"{row['kld']:.4f}",
                      f"{row['kld_max']:.4f}", f"{row['top1']:.1%}", f"{row['ppl_cold']:.3f}",
                      f"{row['delta_ppl']:+.4f}")
    Console().print(table)
    Console().print(f"wrote {json_path}")
