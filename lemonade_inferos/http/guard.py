"""The request guard: what makes a loopback server safe from the web pages its user opens.

Binding to 127.0.0.1 keeps other machines out, not the user's own browser: any page can send a "simple"
cross-site request (a ``text/plain`` POST) to a loopback port, and a DNS-rebinding page can even read the
answers under its own host name. So, before a route runs and before its body is read:

- **Host allow-list**: loopback names (``localhost``, ``*.localhost``), IP literals (a rebinding page always
  arrives under a DNS name) and the hosts the user configured; anything else is 400 ``invalid_host``.
- **Cross-site writes refused**: a request that can change state (any method but GET/HEAD/OPTIONS) from a
  browser page whose ``Origin`` is not loopback or configured is 403, as is one marked
  ``Sec-Fetch-Site: cross-site``; a body sent as one of the form types a page may send without a CORS
  preflight (``text/plain``, form data) is 415 — APIs here take JSON (the control API's config also YAML/TOML).
- **The token first**: where a token is required it is checked here, exactly (constant-time, no trimming),
  so a request without it gets 401 whatever its body holds.

A pure ASGI middleware, so streaming responses and client disconnects pass through untouched.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from lemonade_inferos.http.errors import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class TokenRule:
    """Requests that need a token, and how it is sent.

    ``header`` is the header's name; with ``scheme`` ("Bearer") the header is ``<scheme> <token>``; ``also``:
    headers that carry the bare token instead (Anthropic's clients send ``X-Api-Key``).
    ``needs(method, path)`` says whether a request needs it.
    """

    token: str
    header: str
    needs: Callable[[str, str], bool]
    scheme: str | None = None
    message: str = "a valid token is required"
    also: tuple[str, ...] = ()

    def accepted(self, headers: Mapping[bytes, bytes]) -> bool:
        """Whether a request's headers (lower-case names) carry the token in any of its accepted forms."""
        if self.accepts(headers.get(self.header.lower().encode())):
            return True
        return any(secrets.compare_digest(headers.get(name.lower().encode(), b""), self.token.encode())
                   for name in self.also)

    def accepts(self, value: bytes | None) -> bool:
        if value is None:
            return False
        if self.scheme:
            prefix = self.scheme.encode() + b" "
            if value[:len(prefix)].lower() != prefix.lower():
                return False
            value = value[len(prefix):]
        return secrets.compare_digest(value, self.token.encode())


@dataclass(frozen=True)
class GuardPolicy:
    allowed_hosts: frozenset[str] = frozenset()       # extra host names (lower case); "*" admits any
    allowed_origins: frozenset[str] = frozenset()     # extra origins ("https://app.example"); "*" admits any
    token: TokenRule | None = None


def is_loopback_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host name of a ``Host`` header value (``[::1]:8000`` -> ``::1``, ``a:80`` -> ``a``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    """ASGI middleware applying a :class:`GuardPolicy` to every HTTP request."""

    def __init__(self, app: Any, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict[str, Any]):
        """The error response for a request that must not reach the app, else None."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.lower(), value)
        policy, method, path = self.policy, scope["method"], scope["path"]
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self._host_allowed(split_host(host)):
            return error_response(400, "invalid_host", f"Host '{host}' is not served here: this server answers "
                                  "loopback names and IP addresses (allow more with LEMONADE_ALLOWED_HOSTS)")
        if method not in SAFE_METHODS:
            origin = headers.get(b"origin")
            if origin is not None and not self._origin_allowed(origin.decode("latin-1")):
                return error_response(403, "cross_origin_forbidden",
                                      f"requests that change state are not accepted from the page at "
                                      f"{origin.decode('latin-1')!r} (allow an origin with LEMONADE_ALLOWED_ORIGINS)")
            if origin is None and headers.get(b"sec-fetch-site") == b"cross-site":
                return error_response(403, "cross_origin_forbidden",
                                      "requests that change state are not accepted from another site")
        if policy.token is not None and method != "OPTIONS" and policy.token.needs(method, path):
            if not policy.token.accepted(headers):
                return error_response(401, "unauthorized", policy.token.message,
                                      headers={"WWW-Authenticate": policy.token.scheme} if policy.token.scheme
                                      else None)
        if method not in SAFE_METHODS and self._has_body(headers):
            content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if content_type in FORM_TYPES:
                return error_response(415, "unsupported_media_type",
                                      f"a {content_type} body is not accepted: send JSON with "
                                      "'Content-Type: application/json'")
        return None

    def _host_allowed(self, host: str) -> bool:
        allowed = self.policy.allowed_hosts
        return "*" in allowed or host in allowed or is_loopback_name(host) or _is_ip_literal(host)

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.policy.allowed_origins
        if "*" in allowed or origin.lower().rstrip("/") in allowed:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and is_loopback_name(parts.hostname)

    @staticmethod
    def _has_body(headers: dict[bytes, bytes]) -> bool:
        length = headers.get(b"content-length")
        return (length is not None and length.strip() not in (b"", b"0")) or b"transfer-encoding" in headers


def guard_policy_from_env(environ: Mapping[str, str], token: TokenRule | None = None,
                          bind_host: str | None = None) -> GuardPolicy:
    """``LEMONADE_ALLOWED_HOSTS`` and ``LEMONADE_ALLOWED_ORIGINS`` (comma-separated; ``*`` admits any), plus the
    name the server was told to bind (``--host myhost.lan`` is served under that name)."""
    def items(name: str) -> frozenset[str]:
        return frozenset(v.strip().lower().rstrip("/") for v in environ.get(name, "").split(",") if v.strip())

    hosts = items("LEMONADE_ALLOWED_HOSTS") | ({bind_host.lower()} if bind_host else set())
    return GuardPolicy(allowed_hosts=hosts, allowed_origins=items("LEMONADE_ALLOWED_ORIGINS"), token=token)
