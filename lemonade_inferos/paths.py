"""Where build artifacts live: ``INFEROS_HOME``, else a per-user cache folder.

Models are built into the cache and never into a source checkout. These functions only name folders: a
read-only command (``lemonade-server list``, ``inferos config show``) creates nothing, and whatever writes creates
the folder it writes into (``durable.atomic_write`` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def inferos_home() -> Path:
    """The root of everything inferos writes (models, benchmark caches)."""
    env = os.environ.get("INFEROS_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("inferos"))


def models_dir() -> Path:
    """Folder holding one sub-folder per built model variant."""
    return inferos_home() / "models"
