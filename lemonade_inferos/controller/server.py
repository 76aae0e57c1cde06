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
    """``INFEROS_RANDOM_PORT=true`` -> 0 (the system picks a free one at bind); else ``INFEROS_AGENT_PORT``; else
    ``configured``; else 7031."""
    if os.environ.get("INFEROS_RANDOM_PORT", "false").lower() == "true":
        return 0
    if os.environ.get("INFEROS_AGENT_PORT"):
        return int(os.environ["INFEROS_AGENT_PORT"])
    return configured or DEFAULT_PORT


def port_file():
    return inferos_home() / "agent-port"


class ControlServer:
    """The control API's uvicorn server on a thread of its own, on a socket bound before the thread starts: a port
    that another process holds is known at start, and this server then runs without a control API and says why."""

    def __init__(self, controller: Controller, port: int | None = None) -> None:
        self.controller = controller
        self.port = choose_port(port)
        self.token, self.token_source = resolve_token()
        app = create_control_app(controller, self.token)
        # log_config/log_level None: uvicorn.Config would otherwise reconfigure the process's loggers (and with
        # access_log=False silence the host's access log too)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, log_level=None)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self, timeout_s: float = 10.0) -> bool:
        """Bind and serve; False (and ``error`` says why) when the port cannot be bound or the server does not
        come up within ``timeout_s``."""
        try:
            sock = _bind(self.port)
        except OSError as exc:
            self.error = (f"the control API cannot listen on 127.0.0.1:{self.port}: {exc.strerror or exc} (another "
                          "server's control API? give this one another port with INFEROS_AGENT_PORT, or a free "
                          "one with INFEROS_RANDOM_PORT=true)")
            log.warning("%s; serving without a control API", self.error)
            return False
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="inferos-control-api", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout_s
        while time.time() < deadline and not self._server.started and self._thread.is_alive():
            time.sleep(0.05)
        if not self._server.started:
            self.error = f"the control API did not start on 127.0.0.1:{self.port} within {timeout_s:.0f} s"
            log.error(self.error)
            return False
        atomic_write(port_file(), str(self.port))
        log.info("inferos control API on http://127.0.0.1:%d/v1 (token from %s)", self.port, self.token_source)
        return True

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def _bind(port: int) -> socket.socket:
    """A loopback socket bound to ``port`` (0: a free one), as uvicorn binds its own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock
