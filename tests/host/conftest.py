"""Servers for the host tests come from ``tests/conftest.py``; helpers re-exported for the tests here."""

from __future__ import annotations

import pytest

from lemonade_inferos.bench.servers import free_port, running_server  # noqa: F401


@pytest.fixture(scope="module")
def isolated_plugin_server(isolated_home_module, tmp_path_factory):
    """A plugin server of the test module's own home: what its tests save (options, registrations, telemetry)
    stays out of other tests."""
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0",
                        env={"INFEROS_HOME": str(isolated_home_module)},
                        log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        yield base
