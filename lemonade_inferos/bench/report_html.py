"""The report's outputs besides the JSON: PNG charts, and one self-contained HTML page (charts inlined as data
URIs, no script, no network) a person opens in a browser."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from lemonade_inferos.reports import plot_grouped_bars


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def write_charts(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput, first-token latency and p95 latency per prompt set (baseline vs inferos); the ablation's TPS
    and TTFT per configuration, and its synergy."""
    sets = list(report["by_set"])
    b, i = report["baseline"]["by_set"], report["inferos"]["by_set"]
    charts = []
    for name, key, label in (("throughput", ("throughput", "tokens_per_second"), "tokens/s"),
                             ("first-token-latency", ("first_token_latency", "mean_ms"), "TTFT mean, ms"),
                             ("latency-p95", ("latency", "p95_ms"), "request latency p95, ms")):
        path = out_dir / f"report-{name}.png"
        plot_grouped_bars(path, sets, {"baseline (og.Generator)": [b[s][key[0]][key[1]] or 0 for s in sets],
                                       "inferos": [i[s][key[0]][key[1]] or 0 for s in sets]}, label,
                          f"{label} per prompt set", "%.0f" if "ms" in label else "%.1f")
        charts.append(path)
    ablation = report.get("ablation")
    if ablation:
        configs = list(ablation["configurations"])
        rows = ablation["configurations"]
        path = out_dir / "report-ablation.png"
        plot_grouped_bars(path, configs, {"tokens/s": [rows[c]["throughput"]["tokens_per_second"] for c in configs],
                                          "TTFT mean / 10, ms": [rows[c]["first_token_latency"]["mean_ms"] / 10
                                                                 for c in configs]},
                          "value", "ablation: throughput and first-token latency", size=(9, 4))
        charts.append(path)
        analysis = ablation["analysis"]["synergy_analysis"]
        if analysis:
            path = out_dir / "report-synergy.png"
            combos = list(analysis)
            plot_grouped_bars(path, combos, {"expected (sum of individual), %": [analysis[c]["expected"] for c in combos],
                                             "actual, %": [analysis[c]["actual"] for c in combos]},
                              "TPS change vs ablation baseline, %", "synergy: combined vs individual effects")
            charts.append(path)
    return charts


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def mode_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per prompt set and overall: baseline and inferos side by side."""
    rows = []
    groups = [(s, report["baseline"]["by_set"][s], report["inferos"]["by_set"][s], report["by_set"][s])
              for s in report["by_set"]]
    groups.append(("all", report["baseline"], report["inferos"], report["improvements"]))
    for name, b, i, imp in groups:
        rows.append([name, _fmt(b["throughput"]["tokens_per_second"]), _fmt(i["throughput"]["tokens_per_second"]),
                     _fmt(imp["throughput_ratio"], 2, "x"), _fmt(b["first_token_latency"]["mean_ms"], 0),
                     _fmt(i["first_token_latency"]["mean_ms"], 0), _fmt(imp["ttft_ratio"], 3, "x"),
                     _fmt(b["latency"]["p95_ms"], 0), _fmt(i["latency"]["p95_ms"], 0),
                     _fmt(b["quality"]["mean_score"], 3), _fmt(i["quality"]["mean_score"], 3)])
    return rows


MODE_HEADER = ["set", "TPS baseline", "TPS inferos", "TPS ratio", "TTFT ms baseline", "TTFT ms inferos", "TTFT ratio",
               "p95 ms baseline", "p95 ms inferos", "quality baseline", "quality inferos"]


def _latency_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode in ("baseline", "inferos"):
        m = report[mode]
        lat, ftl = m["latency"], m["first_token_latency"]
        rows.append([mode, *(_fmt(lat[k], 0) for k in ("mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms")),
                     _fmt(ftl["mean_ms"], 0), _fmt(ftl["p95_ms"], 0), _fmt(m["memory"]["peak_rss_mb"], 0),
                     _fmt(m["quality"]["mean_score"], 3), str(m["requests"])])
    return rows


def ablation_rows(ablation: dict[str, Any]) -> list[list[str]]:
    rows = []
    base = ablation["configurations"]["baseline"]["throughput"]["tokens_per_second"]
    for name, r in ablation["configurations"].items():
        active = r["active"]
        ran = [f for f in ("kv", "io", "hybrid", "spec") if active.get(f)]
        rows.append([name, r["description"], _fmt(r["throughput"]["tokens_per_second"]),
                     _fmt((r["throughput"]["tokens_per_second"] / base - 1) * 100, 1, " %"),
                     _fmt(r["first_token_latency"]["mean_ms"], 0), _fmt(r["latency"]["p95_ms"], 0),
                     _fmt(r["memory"]["peak_rss_mb"], 0), _fmt(r["quality"]["mean_score"], 3),
                     ", ".join(ran) or "none"])
    return rows


ABLATION_HEADER = ["config", "what", "TPS", "vs baseline", "TTFT ms", "p95 ms", "peak RSS MiB", "quality",
                   "active (measured)"]


def write_html(report: dict[str, Any], charts: list[Path], path: Path) -> None:
    imp = report["improvements"]
    parts = [f"<h1>inferos bench report: {html.escape(report['model'])}</h1>",
             f"<p>{html.escape(report['environment']['date'])} · {report['environment']['cpus']} CPUs · onnxruntime "
             f"{html.escape(report['environment']['onnxruntime'])} · {report['config']['warmup']} warm-up and "
             f"{report['config']['runs']} measured runs per prompt · generation "
             f"{html.escape(str(report['config']['generation']))}</p>",
             "<h2>Summary</h2>",
             _table(["throughput", "latency", "first-token latency", "memory", "quality change"],
                    [[_fmt(imp["tps_improvement"], 1, " %"), _fmt(imp["latency_reduction"], 1, " % lower"),
                      _fmt(imp["ftl_reduction"], 1, " % lower"), _fmt(imp.get("memory_reduction"), 1, " % lower"),
                      _fmt(imp["quality_change"], 3)]]),
             "<h2>Per prompt set</h2>", _table(MODE_HEADER, mode_rows(report)),
             "<h2>Latency (all sets)</h2>",
             _table(["mode", "mean ms", "median ms", "p95 ms", "p99 ms", "std ms", "TTFT mean", "TTFT p95",
                     "peak RSS MiB", "quality", "requests"], _latency_rows(report))]
    ablation = report.get("ablation")
    if ablation:
        parts += [f"<h2>Ablation ({html.escape(', '.join(ablation['sets']))})</h2>",
                  _table(ABLATION_HEADER, ablation_rows(ablation))]
        analysis = ablation["analysis"]
        parts.append(_table(["combination", "expected %", "actual %", "synergy (points)", "interpretation"],
                            [[c, _fmt(a["expected"]), _fmt(a["actual"]), _fmt(a["synergy"]), a["interpretation"]]
                             for c, a in analysis["synergy_analysis"].items()]))
    for chart in charts:
        data = base64.b64encode(chart.read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(chart.stem)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("<p>Quality: mean log-probability per reply token under the full-precision model (higher is "
                 "better; the same judge for every mode). First-token latency is measured at the client.</p>")
    style = ("body{font:14px system-ui,sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;"
             "margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f1f5f9}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    path.write_text(f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>inferos bench report"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The report's tables as Markdown (what docs/report-and-tuning.md quotes)."""
    parts = [_md_table(MODE_HEADER, mode_rows(report))]
    if report.get("ablation"):
        ablation = report["ablation"]
        parts.append(_md_table(ABLATION_HEADER, ablation_rows(ablation)))
        parts.append(_md_table(["combination", "expected %", "actual %", "synergy (points)", "interpretation"],
                               [[c, _fmt(a["expected"]), _fmt(a["actual"]), _fmt(a["synergy"]), a["interpretation"]]
                                for c, a in ablation["analysis"]["synergy_analysis"].items()]))
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
