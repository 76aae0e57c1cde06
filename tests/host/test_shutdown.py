"""Stopping the server: signals end running generations, write the prefix store, remove only our own pid file,
exit 0; a second server on a busy port touches nothing of the first."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lemonade_inferos.bench.servers import free_port, server_process

MODEL = "SmolLM2-135M-Instruct-CPU"
LONG = {"model": MODEL, "messages": [{"role": "system", "content": "You are a storyteller. " * 20},
                                     {"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 100_000, "ignore_eos": True}


def _stream_until_stopped(base: str, events: list[str], first_token: threading.Event) -> None:
    with httpx.stream("POST", f"{base}/api/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first_token.set()


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT), (signal.SIGTERM,
                                                                                           signal.SIGTERM)],
                         ids=["sigterm", "sigint-twice", "sigterm-twice"])
def test_a_signal_during_a_long_generation_stops_cleanly(isolated_home, tmp_path, signals):
    port = free_port()
    pid_file = isolated_home / "run" / f"server-{port}.pid"
    log_path = tmp_path / "server.log"
    with server_process("--plugin", "inferos", env={"INFEROS_HOME": str(isolated_home)}, port=port,
                        log_path=log_path) as (base, proc):
        assert pid_file.read_text() == str(proc.pid)
        events: list[str] = []
        first_token = threading.Event()
        client = threading.Thread(target=_stream_until_stopped, args=(base, events, first_token))
        client.start()
        assert first_token.wait(60)
        started = time.perf_counter()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.2)
        assert proc.wait(timeout=30) == 0
        stop_s = time.perf_counter() - started
        client.join(10)
    assert stop_s < 15
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"
    assert list((isolated_home / "prefix-cache").glob("*.npz")), "the prefix store was not written at shutdown"
    assert not pid_file.exists()
    assert "Traceback" not in log_path.read_text()


def test_a_second_server_on_a_busy_port_fails_clearly_and_leaves_the_first_alone(isolated_home):
    port = free_port()
    env = {"INFEROS_HOME": str(isolated_home)}
    with server_process("--plugin", "inferos", env=env, port=port) as (base, proc):
        pid_file = isolated_home / "run" / f"server-{port}.pid"
        second = subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "serve", "--port",
                                 str(port)], env={**_environ(), **env}, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"pid {proc.pid}" in second.stderr and "lemonade-server stop" in second.stderr
        assert pid_file.read_text() == str(proc.pid)
        assert httpx.get(f"{base}/live").status_code == 200
        stop = subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "stop", "--port",
                               str(port)], env={**_environ(), **env}, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and f"Stopped server (pid {proc.pid})" in stop.stdout
        assert proc.poll() == 0 and not pid_file.exists()


def test_stop_clears_a_stale_pid_file(isolated_home):
    port = free_port()
    pid_file = isolated_home / "run" / f"server-{port}.pid"
    pid_file.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file.write_text(str(dead.pid))
    stop = subprocess.run([sys.executable, "-m", "lemonade_inferos.cli.lemonade_server", "stop", "--port", str(port)],
                          env={**_environ(), "INFEROS_HOME": str(isolated_home)}, capture_output=True, text=True)
    assert stop.returncode == 0 and "stale pid file" in stop.stdout and not pid_file.exists()


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
