"""Plugin discovery and validation: the real entry point, and faked broken ones."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from lemonade_inferos import plugins
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.plugin import InferosPlugin
from lemonade_inferos.plugins import PluginError, load_plugins, parse_manifest


def test_inferos_is_discovered_from_its_installed_entry_point():
    assert plugins.installed_plugins()["inferos"].value == "lemonade_inferos.plugin:InferosPlugin"
    pm, manifests = load_plugins(["inferos"])
    assert manifests["inferos"].hooks == ("host_startup", "host_shutdown", "load_session", "pre_run",
                                          "run_generation", "make_cache", "post_run")
    assert pm.get_plugin("inferos") is not None


def test_root_and_package_manifests_are_the_same():
    root = Path(__file__).parents[2]
    assert (root / "plugin.toml").read_text() == (root / "lemonade_inferos" / "plugin.toml").read_text()


def _fake_entry_points(monkeypatch, value: str, name: str = "fake"):
    entry = importlib.metadata.EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "installed_plugins", lambda: {name: entry})


def test_a_plugin_that_fails_to_import_is_refused(monkeypatch):
    _fake_entry_points(monkeypatch, "no_such_module_xyz:Plugin")
    with pytest.raises(PluginError, match="failed to import"):
        load_plugins(["fake"])


def test_a_plugin_without_manifest_is_refused(monkeypatch):
    _fake_entry_points(monkeypatch, "tests.host.test_plugins:NoManifestPlugin")
    with pytest.raises(PluginError, match="plugin.toml"):
        load_plugins(["fake"])


class NoManifestPlugin:
    def __init__(self, config):
        pass

    @hookimpl
    def pre_run(self, context):
        return None


def test_manifest_declaring_hooks_the_plugin_lacks_is_refused(monkeypatch):
    _fake_entry_points(monkeypatch, "lemonade_inferos.plugin:InferosPlugin", name="inferos")
    real = InferosPlugin.post_run
    monkeypatch.delattr(InferosPlugin, "post_run")
    try:
        with pytest.raises(PluginError, match="declares hooks"):
            load_plugins(["inferos"])
    finally:
        InferosPlugin.post_run = real


def test_allow_list_refuses_other_plugins(monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_LIST_ENV, "someone_else")
    with pytest.raises(PluginError, match="not in"):
        load_plugins(["inferos"])


@pytest.mark.parametrize("text,match", [
    ("[plugin]\nname='x'\nversion='1'\n", "needs 'hooks'"),
    ("[plugin]\nname='x'\nversion='1'\nhooks=['pre_rnu']\n", "unknown hooks"),
    ("name = ", "invalid TOML"),
])
def test_bad_manifests_say_what_is_wrong(text, match):
    with pytest.raises(PluginError, match=match):
        parse_manifest(text, "plugin.toml")
