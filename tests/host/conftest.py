"""Servers for the host tests come from ``tests/conftest.py``; helpers re-exported for the tests here."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from lemonade_inferos.bench.servers import free_port, running_server  # noqa: F401


@pytest.fixture(scope="module")
def isolated_plugin_server(isolated_home_module, tmp_path_factory):
    """A plugin server of the test module's own home: what its tests save (options, registrations, telemetry)
    stays out of other tests."""
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0",
                        env={"INFEROS_HOME": str(isolated_home_module)},
                        log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        yield base


@contextmanager
def host_in_process(pm, **create_app_options):
    """A real host of ``pm``'s plugins on a free loopback port in this process, so a test can reach its plugin
    objects and its model manager; yields the base URL and the app."""
    from lemonade_inferos.host.app import create_app
    from lemonade_inferos.host.settings import HostSettings

    port = free_port()
    app = create_app(HostSettings(port=port), pm, **create_app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the in-process host did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
