"""Where build artifacts live: ``INFEROS_HOME``, else a per-user cache folder.

Models are built into the cache and never into a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def inferos_home() -> Path:
    """The root of everything inferos writes (models, benchmark caches)."""
    env = os.environ.get("INFEROS_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("inferos"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Folder holding one sub-folder per built model variant."""
    path = inferos_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
