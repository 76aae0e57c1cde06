"""Servers for the host tests come from ``tests/conftest.py``; helpers re-exported for the tests here."""

from __future__ import annotations

from lemonade_inferos.bench.servers import free_port, running_server  # noqa: F401
