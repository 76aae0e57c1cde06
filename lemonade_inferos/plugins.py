"""Finding, validating and registering host plugins.

Plugins are Python entry points in the ``lemonade_server.plugins`` group,
selected by name (``--plugin NAME``, repeatable). Each ships a ``plugin.toml``
manifest beside its module; the host checks it (name, version, hooks) and
refuses a plugin whose manifest or hook implementations are wrong, with a
message that says what to fix. ``LEMONADE_SERVER_PLUGINS`` (comma-separated),
when set, is an allow-list.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import inspect
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import pluggy

from lemonade_inferos import hookspecs
from lemonade_inferos.errors import InferosError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lemonade_server.plugins"
ALLOW_LIST_ENV = "LEMONADE_SERVER_PLUGINS"
HOOK_NAMES = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
              if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")}


class PluginError(InferosError):
    code = "plugin_error"


class PluginDisabled(Exception):
    """Raised by a plugin's constructor when its own settings turn it off: the host runs without it and says so."""


@dataclass(frozen=True)
class PluginManifest:
    name: str
    version: str
    hooks: tuple[str, ...]
    description: str = ""
    config: dict[str, Any] | None = None
    disabled: str | None = None      # why the plugin turned itself off (it is not registered), else None


def parse_manifest(text: str, source: str) -> PluginManifest:
    """Validate a plugin.toml document.

    Raises:
        PluginError: a required key is missing or a hook is not one the host defines.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PluginError(f"{source}: invalid TOML: {exc}") from exc
    section = data.get("plugin")
    if not isinstance(section, dict):
        raise PluginError(f"{source}: missing [plugin] table")
    for key in ("name", "version", "hooks"):
        if key not in section:
            raise PluginError(f"{source}: [plugin] needs '{key}'")
    hooks = section["hooks"]
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise PluginError(f"{source}: 'hooks' must be a list of hook names")
    unknown = sorted(set(hooks) - HOOK_NAMES)
    if unknown:
        raise PluginError(f"{source}: unknown hooks {unknown}; the host defines {sorted(HOOK_NAMES)}")
    return PluginManifest(str(section["name"]), str(section["version"]), tuple(hooks),
                          str(section.get("description", "")), dict(section.get("config", {})))


def _manifest_for(obj: Any, entry_point: importlib.metadata.EntryPoint) -> PluginManifest:
    package = obj.__module__.rpartition(".")[0] or obj.__module__
    try:
        text = (importlib.resources.files(package) / "plugin.toml").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError) as exc:
        raise PluginError(f"plugin '{entry_point.name}' ({entry_point.value}) ships no plugin.toml "
                          f"in package {package}") from exc
    manifest = parse_manifest(text, f"{package}/plugin.toml")
    if manifest.name != entry_point.name:
        raise PluginError(f"plugin.toml of {package} names '{manifest.name}' but the entry point is "
                          f"'{entry_point.name}'")
    return manifest


def _implemented_hooks(plugin: Any) -> set[str]:
    return {name for name in dir(plugin)
            if hasattr(getattr(plugin, name, None), f"{hookspecs.PROJECT}_impl")}


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(names: list[str], options: dict[str, dict[str, Any]] | None = None,
                 pm: pluggy.PluginManager | None = None) -> tuple[pluggy.PluginManager, dict[str, PluginManifest]]:
    """Load, validate and register the named plugins.

    Args:
        names: plugin names as given to ``--plugin``.
        options: per plugin name, the options passed to its constructor as given (``--plugin-option
            NAME.KEY=VALUE``, ``--NAME-KEY VALUE``, ``--config``); the host knows none of their meanings.

    Raises:
        PluginError: a plugin is unknown, not allowed, broken, refuses its options, or its manifest and hooks
            disagree. A plugin that disables itself (:class:`PluginDisabled`) is skipped with a log line.
    """
    pm = pm or new_plugin_manager()
    available = installed_plugins()
    allowed = os.environ.get(ALLOW_LIST_ENV)
    manifests: dict[str, PluginManifest] = {}
    for name in dict.fromkeys(names):
        if allowed is not None and name not in {n.strip() for n in allowed.split(",")}:
            raise PluginError(f"plugin '{name}' is not in {ALLOW_LIST_ENV}={allowed}")
        if name not in available:
            raise PluginError(f"no plugin named '{name}' is installed (entry point group {ENTRY_POINT_GROUP}); "
                              f"installed: {sorted(available) or 'none'}")
        entry_point = available[name]
        try:
            obj = entry_point.load()
        except Exception as exc:  # a broken third-party import: say which and why
            raise PluginError(f"plugin '{name}' failed to import ({entry_point.value}): {exc}") from exc
        manifest = _manifest_for(obj, entry_point)
        try:
            plugin = obj(dict((options or {}).get(name, {}))) if inspect.isclass(obj) else obj
        except PluginDisabled as exc:
            log.warning("plugin %s is disabled: %s", name, exc)
            manifests[name] = replace(manifest, disabled=str(exc))
            continue
        except ValueError as exc:  # its settings are wrong (a file, a variable, an option): the message names it
            raise PluginError(f"plugin '{name}' refused its settings: {exc}") from exc
        implemented = _implemented_hooks(plugin)
        if set(manifest.hooks) != implemented:
            raise PluginError(f"plugin '{name}': plugin.toml declares hooks {sorted(manifest.hooks)} but the "
                              f"plugin implements {sorted(implemented)}")
        pm.register(plugin, name=name)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            raise PluginError(f"plugin '{name}' implements a hook the host does not define: {exc}") from exc
        manifests[name] = manifest
        log.info("loaded plugin %s %s", name, manifest.version)
    return pm, manifests
