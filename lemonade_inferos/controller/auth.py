"""The control API's token: ``INFEROS_AGENT_TOKEN``, else one generated once and kept in a user-only file.

The token file is written atomically with mode 0600 before any byte of it exists. A file that does not
hold a token (damaged, empty, edited into something else) is quarantined and a new token generated. A
generated token is shown once, on the terminal that started the server, and never written to a log: a
service's log file outlives the moment, so without a terminal only the file's path is logged. The check
itself (exact, constant-time, before the body is read) is the request guard's (``http/guard.py``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from pathlib import Path

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)
TOKEN_ENV = "INFEROS_AGENT_TOKEN"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_\-]{16,512}")


def token_file() -> Path:
    return inferos_home() / "agent-token"


def read_token_file(path: Path) -> str | None:
    """The token kept in ``path``, or None (missing; a damaged file is quarantined)."""
    if not path.is_file():
        return None
    try:
        token = path.read_bytes().decode("ascii").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        quarantine(path, f"unreadable token file: {exc}")
        return None
    if TOKEN_PATTERN.fullmatch(token):
        return token
    quarantine(path, "does not hold a token (16-512 characters of A-Z a-z 0-9 _ -)")
    return None


def resolve_token() -> tuple[str, str]:
    """Returns (token, where it came from)."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env, "env"
    path = token_file()
    token = read_token_file(path)
    if token is not None:
        return token, str(path)
    token = secrets.token_urlsafe(32)
    atomic_write(path, token, mode=0o600)
    announce(token, path)
    return token, str(path)


def announce(token: str, path: Path) -> None:
    """Show a new token on the terminal only (stderr when it is one, else nothing but the path in the log)."""
    if sys.stderr.isatty():
        print(f"inferos control API token (generated once; also in {path}, readable only by you): {token}",
              file=sys.stderr, flush=True)
    else:
        log.warning("generated the inferos control API token; it is kept in %s (mode 0600), not logged", path)
