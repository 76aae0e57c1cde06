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
