"""Lemonade's ``extra_models_dir``: GGUF files a user keeps in a folder of their own, listed as ``extra.NAME``
(the file's name without ``.gguf``, as Lemonade names them) and converted once, at their first load or pull, into
an int4 folder of the model cache, as a ``user.NAME`` GGUF is (``registry.py``). The folder is read when the list
is asked for: a file dropped in is there at the next request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lemonade_inferos.engine.build import gguf_build_name

EXTRA_PREFIX = "extra."
ENV = "LEMONADE_EXTRA_MODELS_DIR"
GGUF_RECIPE = "llamacpp"   # Lemonade's recipe for a GGUF: here the file is converted and runs on our engine


def extra_models(folder: Path | None) -> dict[str, dict[str, Any]]:
    """``extra.NAME`` -> its registration, for every GGUF under ``folder`` (none when it is unset or missing).
    A vision projector (``mmproj*``) is not a model; the first of two files with one name wins."""
    if folder is None or not folder.is_dir():
        return {}
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*.gguf")):
        if path.name.lower().startswith("mmproj") or not path.is_file():
            continue
        source = str(path.resolve())
        found.setdefault(EXTRA_PREFIX + path.stem, {
            "checkpoint": source, "source": source, "recipe": GGUF_RECIPE, "suggested": False,
            "size": round(path.stat().st_size / 1e9, 3), "labels": ["llm", "custom"],
            "build": {"model": gguf_build_name("extra", path.stem), "weights": "int4", "kv": "fp32",
                      "gguf": source}})
    return found


def configured_folder() -> Path | None:
    """The folder ``LEMONADE_EXTRA_MODELS_DIR`` names, if any (the ``--extra-models-dir`` option's twin)."""
    value = os.environ.get(ENV)
    return Path(value).expanduser() if value else None
