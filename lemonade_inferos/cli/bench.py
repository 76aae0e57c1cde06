"""``inferos bench engine|kv|prefill|memory|...``: benchmarks, JSON plus a PNG, against a baseline in the same run
(the ones that run servers are ``bench_servers.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lemonade_inferos.cli.bench_concurrency import bench_concurrency_cmd
from lemonade_inferos.cli.bench_servers import (bench_multiturn_cmd, bench_peers_cmd, bench_report_cmd,
                                                 bench_shared_store_cmd)
from lemonade_inferos.cli.common import console, handle_errors
from lemonade_inferos.cli.llamacpp_options import gguf_for_llamacpp, llamacpp_options


@click.group()
def bench() -> None:
    """Benchmarks: JSON plus a PNG plot, measured against a baseline in the same run."""


@bench.command("memory")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--context", "contexts", multiple=True, type=int, help="Context tokens of the request (repeatable); "
              "default 2048, 8192 and 16384 (past the model's context our cache evicts).")
@click.option("--new-tokens", default=32, show_default=True)
@llamacpp_options("add llama.cpp rows with f16 and q8_0 KV on it")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/memory.json"),
              show_default=True, help="Where to write the JSON; the PNG goes beside it.")
@handle_errors
def bench_memory_cmd(model_name: str, contexts: tuple[int, ...], new_tokens: int, llamacpp: bool | None,
                     gguf: Path | None, json_path: Path) -> None:
    """Peak RSS of a fresh process for one request: og.Generator, our fp32-live and INT8-live engine (and under
    memory pressure), llama.cpp's f16 and q8_0 KV."""
    from lemonade_inferos.bench.memory import bench_memory
    from lemonade_inferos.engine.build import resolve_model

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    gguf = gguf_for_llamacpp(llamacpp, gguf, model_name)
    results = bench_memory(folder, list(contexts or (2048, 8192, 16384)), new_tokens, json_path, gguf,
                           progress=console.log)
    table = Table("context", "row", "peak RSS MiB", "below fp32-live MiB", "live KV MiB", "live vs FP16")
    for context, rows in results["contexts"].items():
        for row, r in rows.items():
            if "peak_rss_mb" not in r:
                table.add_row(context, row, r.get("skipped") or r.get("error", ""), "", "", "")
                continue
            table.add_row(context, row, f"{r['peak_rss_mb']:.0f}", f"{r.get('peak_rss_below_fp32_live_mb', 0):.0f}",
                          f"{r['live_kv_bytes'] / 2**20:.0f}" if "live_kv_bytes" in r else "",
                          f"{r['live_vs_fp16_of_held']:.0%}" if "live_vs_fp16_of_held" in r else "")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench.command("guidance")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per row (median reported).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/guidance.json"),
              show_default=True, help="Where to write the JSON; the PNG goes beside it.")
@handle_errors
def bench_guidance_cmd(model_name: str, prompt_tokens: int, new_tokens: int, repeats: int, json_path: Path) -> None:
    """Decode tok/s of constrained decoding (llguidance masks) against unconstrained decoding, same prompt."""
    from lemonade_inferos.bench.guidance import bench_guidance
    from lemonade_inferos.engine.build import resolve_model

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    results = bench_guidance(folder, prompt_tokens, new_tokens, repeats, json_path)
    table = Table("grammar", "decode tok/s", "vs unconstrained", "tokens")
    for name, row in results["rows"].items():
        table.add_row(name, f"{row['decode_tps']:.1f}", f"x{row['vs_unconstrained']:.2f}", f"{row['tokens']:.0f}")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench.command("engine")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per engine (median reported).")
@click.option("--threads", default=0, show_default=True,
              help="intra-op threads for our engine and llama.cpp (0: their defaults).")
@llamacpp_options("time llama.cpp on it in the same loop")
@click.option("--conditions/--no-conditions", default=True, show_default=True,
              help="Also decode at 1 thread and with another process keeping a core busy.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/engine.json"),
              show_default=True, help="Where to write the JSON; the PNG goes beside it.")
@handle_errors
def bench_engine_cmd(model_name: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int,
                     llamacpp: bool | None, gguf: Path | None, conditions: bool, json_path: Path) -> None:
    """Our engine vs og.Generator (and llama.cpp): prefill/decode tok/s, TTFT, peak RSS, identical greedy tokens."""
    from lemonade_inferos.bench.engine import bench_engine
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.session import SessionPolicy

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    gguf = gguf_for_llamacpp(llamacpp, gguf, model_name)
    results = bench_engine(folder, prompt_tokens, new_tokens, repeats, json_path,
                           SessionPolicy(intra_op_num_threads=threads), gguf, conditions)
    table = Table("engine", "prefill tok/s", "decode tok/s", "TTFT s", "peak RSS MiB")
    for name in results["engines"]:
        r = results[name]
        table.add_row(name, f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}", f"{r['ttft_s']:.3f}",
                      f"{r['peak_rss_mb']:.0f}")
    Console().print(table)
    for condition, row in results.get("conditions", {}).items():
        Console().print(f"{condition}: og {row['og_decode_tps']:.1f} tok/s, inferos {row['inferos_decode_tps']:.1f} "
                        f"tok/s, decode x{row['decode_speedup']:.2f}")
    Console().print(f"decode x{results['decode_speedup']:.2f}, prefill x{results['prefill_speedup']:.2f}, "
                    f"identical greedy tokens {results['identical_tokens']}/{results['compared_tokens']}; "
                    f"wrote {json_path} and {json_path.with_suffix('.png')}")
    if "vs_llamacpp" in results:
        Console().print(f"against llama.cpp ({gguf.name}): decode x{results['vs_llamacpp']['decode']:.2f}, "
                        f"prefill x{results['vs_llamacpp']['prefill']:.2f}")


@bench.command("spec")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--new-tokens", default=96, show_default=True, help="Greedy tokens decoded per run.")
@click.option("--repeats", default=2, show_default=True, help="Runs per configuration (median reported).")
@click.option("--draft-model", default=None,
              help="Also draft with this model (same tokenizer), e.g. smollm2-135m-int4 for smollm2-135m.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/spec.json"),
              show_default=True)
@handle_errors
def bench_spec_cmd(model_name: str, new_tokens: int, repeats: int, draft_model: str | None, json_path: Path) -> None:
    """Speculative decoding and the thread policy: four prompt sets, og.Generator (plain and n-gram) and our engine
    (plain, ngram, auto) at 1 thread, 2 threads, and 2 threads with a core kept busy."""
    from lemonade_inferos.bench.spec import CONDITIONS, bench_spec
    from lemonade_inferos.engine.build import resolve_model

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    with console.status("benchmarking") as status:
        if draft_model:
            resolve_model(draft_model, build_missing=True, progress=console.log)
        results = bench_spec(folder, new_tokens, repeats, json_path, progress=status.update, draft_model=draft_model)
    table = Table("condition", "set", "config", "decode tok/s", "x og plain", "x og ngram", "accept", "identical")
    for row in results["rows"]:
        ratio = results["ratios"][f"{row['condition']} | {row['set']}"][row["config"]]
        table.add_row(row["condition"], row["set"], row["config"], f"{row['decode_tps']:.1f}",
                      f"{ratio['vs_og_plain']:.2f}", f"{ratio['vs_og_ngram']:.2f}",
                      "-" if row["accept_rate"] is None else f"{row['accept_rate']:.0%}",
                      f"{row['identical_tokens']}/{new_tokens}")
    Console().print(table)
    Console().print(f"conditions: {', '.join(CONDITIONS)}; wrote {json_path} and {json_path.with_suffix('.png')}")


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
    from lemonade_inferos.kvcache.plan import needs_attention_probe

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


@bench.command("prefill")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model name or folder.")
@click.option("--history", "history_tokens", default=2048, show_default=True, help="Tokens of the cold prompt.")
@click.option("--turn", "turn_tokens", default=256, show_default=True, help="New tokens prefilled over it.")
@click.option("--decode", "decode_tokens", default=64, show_default=True, help="Tokens decoded after the turn.")
@click.option("--repeats", default=3, show_default=True, help="Runs per live form, alternating.")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: one per core).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench-out/prefill.json"),
              show_default=True)
@handle_errors
def bench_prefill_cmd(model_name: str, history_tokens: int, turn_tokens: int, decode_tokens: int, repeats: int,
                      threads: int, json_path: Path) -> None:
    """The INT8 live form vs the float live form: cold prompt, a turn over the history, decode (tok/s, ratios)."""
    from lemonade_inferos.bench.prefill import MEASURES, bench_prefill
    from lemonade_inferos.engine.build import resolve_model
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    folder = resolve_model(model_name, build_missing=True, progress=console.log)
    engine = OrtEngine(folder, SessionPolicy(intra_op_num_threads=threads))
    with console.status("benchmarking"):
        results = bench_prefill(engine, history_tokens, turn_tokens, decode_tokens, repeats, json_path)
    table = Table("live form", *MEASURES.values(), "live KV vs FP16")
    for form, entry in results["forms"].items():
        table.add_row(form, *(f"{entry[m]['median']:.1f} ({entry[m]['min']:.1f}-{entry[m]['max']:.1f})"
                              for m in MEASURES), f"{entry['live_kv_vs_fp16']:.0%}")
    table.add_row("int8 / float", *(f"x{results['ratio_int8_vs_float'][m]:.2f}" for m in MEASURES), "")
    Console().print(table)
    Console().print(f"wrote {json_path} and {json_path.with_suffix('.png')}")



for _command in (bench_peers_cmd, bench_concurrency_cmd, bench_multiturn_cmd, bench_shared_store_cmd, bench_report_cmd):
    bench.add_command(_command)
