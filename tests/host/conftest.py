"""Real servers on free loopback ports, started as users start them: ``lemonade-server serve``."""

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
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, port: int | None = None,
                   log_path: Path | None = None) -> Iterator[str]:
    """Start ``lemonade-server serve ARGS`` and yield its base URL; stop it afterwards."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--port", str(port), *args]
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{base}/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not start in 120 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def plugin_server(model_dir, tmp_path_factory) -> Iterator[str]:
    with running_server("--plugin", "inferos", "--max-queue", "8",
                        log_path=tmp_path_factory.mktemp("logs") / "plugin-server.log") as base:
        yield base


@pytest.fixture(scope="session")
def baseline_server(model_dir, tmp_path_factory) -> Iterator[str]:
    with running_server(log_path=tmp_path_factory.mktemp("logs") / "baseline-server.log") as base:
        yield base
