"""Files the server writes and reads back: written atomically, checked when read, moved aside when damaged.

A crash mid-write must never leave a half-written file under the real name, and a
damaged or foreign file found at start must never stop the server: it is moved to
``INFEROS_HOME/quarantine/`` (kept for a person to inspect, bounded in count and
bytes) with a warning that names it, and the server goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

QUARANTINE_MAX_FILES = 200
QUARANTINE_MAX_BYTES = 256 * 2**20
TEMP_MARK = ".inferos-tmp-"  # temporary files carry this in their name: a leftover is recognisable


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync'ed and renamed over it.

    ``mode`` (e.g. ``0o600``) is set on the temporary file before any byte is written, so a secret is
    never readable by others, not even for a moment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temp_leftover(path: Path) -> bool:
    """A temporary file of :func:`atomic_write` (or a writer using the same mark) left behind by a crash."""
    return TEMP_MARK in path.name


def quarantine_dir() -> Path:
    return inferos_home() / "quarantine"


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a damaged or foreign file aside, with a warning naming it and why; returns where it went.

    Never raises: a file that cannot be moved is deleted instead, and one that cannot be deleted either is
    reported and left (the caller ignores it).
    """
    path = Path(path)
    target_dir = quarantine_dir()
    target = target_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{path.name}"
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    except OSError as exc:
        log.warning("%s is damaged (%s) and could not be moved to %s (%s): deleting it", path, reason,
                    target_dir, exc)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            log.error("%s could not be deleted either; it is ignored", path)
        return None
    log.warning("%s is damaged or foreign (%s): moved to %s", path, reason, target)
    _bound(target_dir)
    return target


def _bound(folder: Path) -> None:
    """Keep the quarantine folder within QUARANTINE_MAX_FILES files and QUARANTINE_MAX_BYTES, oldest out first."""
    try:
        files = sorted((f for f in folder.iterdir() if f.is_file()), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        while files and (len(files) > QUARANTINE_MAX_FILES or total > QUARANTINE_MAX_BYTES):
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
    except OSError as exc:  # a full or read-only disk must not turn cleanup into a crash
        log.warning("could not bound %s: %s", folder, exc)


def read_json_object(path: Path) -> dict | None:
    """A JSON object written by this package, or None when the file is missing; a damaged file (not UTF-8, not
    JSON, not an object) is quarantined and read as missing."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        quarantine(path, "not a JSON object")
        return None
    return data
