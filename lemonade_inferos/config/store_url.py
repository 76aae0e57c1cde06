"""The shared prefix store's URL: the Valkey/Redis forms a setting may name, and how it is shown without its
password. Here, in the configuration layer, so a bad URL is refused when settings are read."""

from __future__ import annotations

from urllib.parse import urlparse, urlunparse

SCHEMES = {"valkey": "redis", "valkeys": "rediss", "redis": "redis", "rediss": "rediss", "unix": "unix"}


def redis_url(url: str) -> str:
    """``valkey://`` / ``valkeys://`` as the ``redis://`` / ``rediss://`` URL redis-py connects to.

    Raises:
        ValueError: not a Valkey/Redis URL.
    """
    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES or (parsed.scheme != "unix" and not parsed.hostname):
        raise ValueError(f"{url!r} is not a Valkey/Redis URL: valkey://HOST:PORT/DB (also redis://, rediss://, "
                         "valkeys://, unix://)")
    return urlunparse(parsed._replace(scheme=SCHEMES[parsed.scheme]))


def shown(url: str) -> str:
    """The URL without its password (for logs and metrics)."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = f"{parsed.username or ''}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
        return urlunparse(parsed._replace(netloc=netloc))
    return url
