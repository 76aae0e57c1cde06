"""Runs the control API in a background thread on 127.0.0.1 (port 7031, INFEROS_AGENT_PORT, or a random one)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import uvicorn

from lemonade_inferos.controller.api import create_control_app
from lemonade_inferos.controller.auth import resolve_token
from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.durable import atomic_write
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)
DEFAULT_PORT = 7031


def choose_port(configured: int | None = None) -> int:
    """``INFEROS_RANDOM_PORT=true`` -> a free port; else ``INFEROS_AGENT_PORT``; else ``configured``; else 7031."""
    if os.environ.get("INFEROS_RANDOM_PORT", "false").lower() == "true":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    if os.environ.get("INFEROS_AGENT_PORT"):
        return int(os.environ["INFEROS_AGENT_PORT"])
    return configured or DEFAULT_PORT


def port_file():
    return inferos_home() / "agent-port"


class ControlServer:
    def __init__(self, controller: Controller, port: int | None = None) -> None:
        self.controller = controller
        self.port = choose_port(port)
        self.token, self.token_source = resolve_token()
        app = create_control_app(controller, self.token)
        # log_config/log_level None: uvicorn.Config would otherwise reconfigure the process's loggers (and with
        # access_log=False silence the host's access log too)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, log_level=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="inferos-control-api", daemon=True)
        self.error: str | None = None

    def start(self, timeout_s: float = 10.0) -> bool:
        self._thread.start()
        deadline = time.time() + timeout_s
        while time.time() < deadline and not self._server.started:
            if not self._thread.is_alive():
                self.error = f"control API could not bind 127.0.0.1:{self.port}"
                log.error("%s (set INFEROS_AGENT_PORT or INFEROS_RANDOM_PORT=true)", self.error)
                return False
            time.sleep(0.05)
        atomic_write(port_file(), str(self.port))
        log.info("inferos control API on http://127.0.0.1:%d/v1 (token from %s)", self.port, self.token_source)
        return self._server.started

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
