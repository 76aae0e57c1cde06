"""Running the host as a process: bind first, serve, and stop the way a service manager expects.

- The listening socket is bound before anything else happens, so a busy port is a clear error at once
  (naming the server that holds it) and touches nothing of the running server; "serving on" is logged only
  once the socket is really accepting.
- The pid file is written after the bind and removed at exit only while it still names this process.
- SIGTERM and SIGINT (also a second one) stop accepting requests, end running generations at their next token
  (their clients get 503 / an SSE error event), run the plugins' shutdown hooks (the prefix store is written
  to disk), and exit 0. uvicorn's own handling re-raises the signal after a graceful stop (exit code -15)
  and skips the shutdown hooks on a second Ctrl-C; both are what this class changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator

import psutil
import uvicorn

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.errors import InferosError
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10.0  # connections still open after this are cancelled; the shutdown hooks still run
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                 getattr(signal, "SIGBREAK", None)) if s is not None)


class PortInUse(InferosError):
    code = "port_in_use"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening; uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name == "nt":  # SO_REUSEADDR on Windows would let two servers share the port
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", socket.SO_REUSEADDR), 1)
    else:  # a port in TIME_WAIT after a restart is free; one another server listens on is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        holder = read_pid(pid_path(port))
        who = (f"lemonade-server (pid {holder}) runs there; stop it with `lemonade-server stop --port {port}`"
               if holder and pid_alive(holder) else "another program holds it")
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({who}); or pick another --port",
                        host=host, port=port) from exc
    return sock


def pid_path(port: int) -> Path:
    return inferos_home() / "run" / f"server-{port}.pid"


def read_pid(path: Path) -> int | None:
    """The pid a pid file names, or None (missing; a damaged file is quarantined)."""
    try:
        text = path.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        quarantine(path, f"unreadable pid file: {exc}")
        return None
    if text.isdigit() and 0 < int(text) < 2**31:
        return int(text)
    quarantine(path, "a pid file must hold one process id")
    return None


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:  # someone else's, and running
        return True
    except psutil.Error:
        return False


@contextlib.contextmanager
def pid_file(port: int) -> Iterator[Path]:
    """Write this process's pid file for ``port``; remove it at exit only if it still names this process."""
    path = pid_path(port)
    atomic_write(path, str(os.getpid()))
    try:
        yield path
    finally:
        if read_pid(path) == os.getpid():
            path.unlink(missing_ok=True)


class HostServer(uvicorn.Server):
    """uvicorn's server with the stop behaviour described in the module docstring."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None], address: str) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.address = address

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            log.info("received %s: stopping (running generations end, state is written)", signal.Signals(sig).name)
        else:
            log.info("received %s again: already stopping (at most %.0f s)", signal.Signals(sig).name,
                     GRACEFUL_SHUTDOWN_S)
        self.on_stop()
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, without raising the signal again once stopped: a clean stop exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("serving on %s", self.address)


def serve(app: object, sock: socket.socket, address: str, log_level: str, on_stop: Callable[[], None]) -> bool:
    """Serve ``app`` on the bound ``sock`` until a stop signal; False when start-up failed."""
    config = uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = HostServer(config, on_stop, address)
    server.run(sockets=[sock])
    return server.started
