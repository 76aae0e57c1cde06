"""Where benchmark and evaluation results go: a JSON file, and a PNG plot beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def plot_path_for(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def plot_grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
                      value_format: str = "%.1f", size: tuple[float, float] = (7, 4)) -> None:
    """One bar per series in every group (e.g. a benchmark's modes at each context length), labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
        ax.bar_label(bars, fmt=value_format, fontsize=7)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
