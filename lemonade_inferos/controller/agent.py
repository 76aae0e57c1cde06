"""A server's link to a sidecar agent (``inferos agent``, the design document's Phase 1 control agent).

With ``INFEROS_AGENT_URL`` (or ``agent_url``) set, the plugin's controller takes its configured policy from the
agent (``GET /v1/policy``, at most once a second from the mid loop) and sends every request's InferenceStats
there (``POST /v1/stats``, queued and sent from the slow loop, never on a request's path), so one agent sees and
steers several servers. The agent's token comes from ``INFEROS_AGENT_TOKEN`` or, on the same machine, the
agent's token file. An agent that does not answer changes nothing: the last policy it gave stays (shown as an
override's reason in ``GET /v1/policy``), stats wait in a bounded queue, and both are retried.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any

import httpx

from lemonade_inferos.hooktypes import InferenceStats

log = logging.getLogger(__name__)

POLL_S = 1.0
MAX_QUEUED = 1000


class AgentLink:
    def __init__(self, url: str, server_id: str, token: str | None = None, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        self.server_id = server_id
        self._token = token
        self.timeout_s = timeout_s
        self.policy: dict[str, Any] | None = None
        self.version: int | None = None
        self.error: str | None = None
        self.last_contact: float | None = None
        self.sent = 0
        self._queue: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED)
        self._next_poll = 0.0
        self._lock = threading.Lock()

    def token(self) -> str | None:
        if self._token is None:
            from lemonade_inferos.controller.auth import resolve_token

            self._token = os.environ.get("INFEROS_AGENT_TOKEN") or resolve_token()[0]
        return self._token

    def fetch_policy(self) -> dict[str, Any] | None:
        """The agent's configured policy (None: not due yet, or the agent did not answer). The server applies it
        whenever its own differs, so the agent stays authoritative over local edits."""
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_S
        try:
            response = httpx.get(f"{self.base}/policy", timeout=self.timeout_s)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._failed(f"GET {self.base}/policy: {exc}")
            return None
        self._reached()
        self.version, self.policy = body.get("version"), body.get("configured") or body.get("policy")
        return self.policy

    def report(self, stats: InferenceStats) -> None:
        with self._lock:
            self._queue.append({**asdict(stats), "server_id": self.server_id})

    def flush(self) -> None:
        """Send the queued stats (one request each; what fails stays queued for the next round)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                item = self._queue[0]
            try:
                response = httpx.post(f"{self.base}/stats", json=item, timeout=self.timeout_s,
                                      headers={"X-Inferos-Token": self.token() or ""})
            except httpx.HTTPError as exc:
                self._failed(f"POST {self.base}/stats: {exc}")
                return
            if response.status_code >= 500 or response.status_code == 401:
                self._failed(f"POST {self.base}/stats: HTTP {response.status_code} {response.text[:200]}")
                return
            with self._lock:
                self._queue.popleft()  # sent (a 4xx is the agent refusing this one item: not retried)
            self.sent += 1
            self._reached()

    def _failed(self, error: str) -> None:
        if error != self.error:
            log.warning("sidecar agent: %s", error)
        self.error = error

    def _reached(self) -> None:
        if self.error is not None:
            log.info("sidecar agent %s reachable again", self.url)
        self.error, self.last_contact = None, time.time()

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "server_id": self.server_id, "policy_version": self.version, "error": self.error,
                "last_contact": self.last_contact, "stats_sent": self.sent, "stats_queued": len(self._queue)}
