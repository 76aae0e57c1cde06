"""Start a real ``lemonade-server`` on a free loopback port (benchmarks and tests talk to it over HTTP)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(*args: str, env: dict[str, str] | None = None, port: int | None = None,
                   log_path: Path | None = None, startup_timeout_s: float = 180
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``lemonade-server serve ARGS``; yield its base URL and process once ``/live`` answers; stop it after."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--port", str(port), *args]
    with http_process(cmd, f"http://127.0.0.1:{port}", "/live", env, log_path, startup_timeout_s) as started:
        yield started


@contextlib.contextmanager
def http_process(cmd: list[str], base: str, ready_path: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, startup_timeout_s: float = 180
                 ) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run any HTTP server ``cmd`` (ours, or a peer's such as llama-server); yield ``base`` and the process once
    ``ready_path`` answers 200; stop it after (SIGTERM, then SIGKILL after 20 s)."""
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)} (log: {log_path})")
            try:
                if httpx.get(f"{base}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not start in {startup_timeout_s:.0f} s")
            time.sleep(0.3)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, port: int | None = None,
                   log_path: Path | None = None, startup_timeout_s: float = 180) -> Iterator[str]:
    """Run ``lemonade-server serve ARGS``; yield its base URL once ``/live`` answers; stop it afterwards."""
    with server_process(*args, env=env, port=port, log_path=log_path, startup_timeout_s=startup_timeout_s) as (base, _):
        yield base
