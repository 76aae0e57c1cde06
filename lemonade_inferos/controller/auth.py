"""The control API's token: ``INFEROS_AGENT_TOKEN``, else one generated once and kept in a user-only file."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from fastapi import Header

from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)
TOKEN_ENV = "INFEROS_AGENT_TOKEN"


def token_file() -> Path:
    return inferos_home() / "agent-token"


def resolve_token() -> tuple[str, str]:
    """Returns (token, where it came from). A generated token is printed once and written with mode 0600."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env, "env"
    path = token_file()
    if path.is_file():
        return path.read_text().strip(), str(path)
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    print(f"inferos control API token (generated; also in {path}, readable only by you): {token}", flush=True)
    return token, str(path)


def make_token_check(token: str):
    """A dependency: ``X-Inferos-Token`` must equal the token (compared in constant time)."""
    from lemonade_inferos.host.errors import APIError

    async def check(x_inferos_token: str | None = Header(default=None)) -> None:
        if not x_inferos_token or not secrets.compare_digest(x_inferos_token.encode(), token.encode()):
            raise APIError(401, "unauthorized", "Unauthorized: a valid X-Inferos-Token header is required")

    return check
