"""The inferos plugin's settings: one pydantic model, and the layers that fill it.

Layers, later ones winning key by key:

    1. built-in defaults                      (the fields below)
    2. the plugin's config file               ``[plugin.config]`` of the shipped ``plugin.toml``
    3. the user's copy                        ``<config dir>/plugin.toml`` (``inferos config path``)
    4. ``--config FILE``                      the design document's YAML/TOML (``infer_os:`` root)
    5. the environment                        ``INFEROS_ENABLED``, ``INFEROS_LOG_LEVEL``, ``INFEROS_AGENT_URL``,
                                              ``INFEROS_AGENT_PORT`` and ``INFEROS_<KEY>`` (``__`` nests:
                                              ``INFEROS_KV__MODE=quality_optimized``)
    6. host options                           ``--plugin-option inferos.kv.mode=dynamic`` or
                                              ``--inferos-kv-mode dynamic`` (the host passes them through)

A key names a field (``prefix_cache_mb``), a policy field (``kv.mode``; the policy's sections may sit at the
top of a layer or under ``policy``) or a loop period (``loops.mid_ms``); ``kv_mode`` and ``recent_window`` are
the short forms of ``kv.mode`` and ``kv.recent_window``. Each layer is validated as it is merged, so a bad value
is refused naming its layer (file and line, variable, option) and field, and the settings in force stay.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lemonade_inferos.config.files import ConfigError, InferOSConfig, LoopsConfig, line_of, load_document, read_text
from lemonade_inferos.config.policy import Policy, deep_merge
from lemonade_inferos.config.sizes import parse_size
from lemonade_inferos.config.store_url import redis_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "INFEROS_"
ENV_LAYER = "environment (INFEROS_*)"
OPTIONS_LAYER = "plugin options (--plugin-option, --inferos-*)"
POLICY_SECTIONS = set(Policy.model_fields)
SHORT_FORMS = {"kv_mode": ("policy", "kv", "mode"), "recent_window": ("policy", "kv", "recent_window")}
ENV_ALIASES = {"AGENT_PORT": "control_port"}
# settings a running server applies at once; the rest are read at start (a change is reported as needing one)
LIVE_FIELDS = {"policy", "loops", "prefix_cache_mb", "warm_caches", "shadow_every", "shadow_max_tokens",
               "importance", "memory_limit", "log_level", "watchdog_s", "quality_schedule", "notifications", "record"}


class QualitySchedule(BaseModel):
    """The design document's quality scheduler: a full evaluation daily at ``full_at`` (local time, HH:MM) and a
    light one every ``light_every_h`` hours; 0 / null turn either off."""

    model_config = ConfigDict(extra="forbid")
    full_at: str | None = Field("06:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    full_context: int = Field(512, ge=64, le=8192)
    light_every_h: float = Field(4.0, ge=0.0)
    light_context: int = Field(128, ge=64, le=8192)


class Notifications(BaseModel):
    """Fallback notifications: a reason seen ``threshold`` times in ``window_s`` is logged as a warning, and
    ``critical_count`` fallbacks of any reason in the window as critical (the design document: 5 in 5 minutes)."""

    model_config = ConfigDict(extra="forbid")
    window_s: float = Field(300.0, gt=0)
    critical_count: int = Field(5, ge=1)
    thresholds: dict[Literal["quality_degradation", "device_error", "memory_pressure", "timeout", "backend_error"],
                     int] = Field(default_factory=lambda: {"quality_degradation": 3, "device_error": 2,
                                                           "memory_pressure": 4, "timeout": 3,
                                                           "backend_error": 3})
    max_log_bytes: int = Field(1_000_000, ge=4096)


class InferosSettings(BaseModel):
    """Everything the plugin reads at start or while it runs, with its default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    enabled: bool = Field(True, description="false: the host runs without the plugin (INFEROS_ENABLED)")
    log_level: Literal["debug", "info", "warning", "error", "critical"] | None = Field(
        None, description="the plugin's loggers (INFEROS_LOG_LEVEL); default: the host's level")
    agent_url: str | None = Field(None, pattern=r"^https?://", description="a sidecar agent (`inferos agent`) "
                                  "whose policy requests run with and to which stats are reported")
    control_api: bool = True
    control_port: int | None = Field(None, ge=0, le=65535, description="default 7031")
    prefix_cache_mb: float = Field(256.0, ge=0)
    prefix_spill_mb: float = Field(1024.0, ge=0)
    prefix_spill_dir: Path | None = None
    prefix_store: str | None = Field(None, description="a Valkey/Redis server shared by servers of the same "
                                     "model, under memory and disk: valkey://HOST:PORT/DB (also redis://)")
    prefix_store_timeout_s: float = Field(0.25, gt=0, description="a Valkey read or write slower than this is "
                                          "a miss (and backs the tier off)")
    importance: Literal["attention", "key_norm", "recency"] = "attention"
    warm_caches: int = Field(1, ge=0)
    shadow_every: int = Field(8, ge=0)
    shadow_max_tokens: int = Field(512, ge=16)
    memory_limit: int | None = Field(None, ge=1, description="bytes, or a size such as 16GB")
    history_path: Path | None = None
    record: Path | None = Field(None, description="append every request (prompt token ids, max_tokens, sampling) "
                                "to this JSON-lines file: a workload `inferos ab` and `inferos tune` replay")
    history_period_s: float = Field(10.0, gt=0)
    guard: dict[str, int | float] | None = None
    watchdog_s: float = Field(120.0, ge=0, description="a generation without a token this long is ended; 0: off")
    quality_schedule: QualitySchedule = Field(default_factory=QualitySchedule)
    notifications: Notifications = Field(default_factory=Notifications)
    config: Path | None = Field(None, description="the --config file (policy and loops), watched for edits")
    policy: Policy = Field(default_factory=Policy)
    loops: LoopsConfig = Field(default_factory=LoopsConfig)

    @field_validator("agent_url", "log_level", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value.lower() if isinstance(value, str) and value.isupper() else value

    @field_validator("prefix_store", mode="before")
    @classmethod
    def _store_url(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        redis_url(str(value))  # ValueError names the accepted forms
        return str(value)

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value in (None, "") else parse_size(value)

    def infer_os(self) -> InferOSConfig:
        return InferOSConfig(policy=self.policy, loops=self.loops)

    def restart_fields(self, other: "InferosSettings") -> list[str]:
        """Fields that differ from ``other`` and only take effect at the next start."""
        mine, theirs = self.model_dump(), other.model_dump()
        return sorted(k for k in mine if k not in LIVE_FIELDS and mine[k] != theirs[k])


def user_config_dir() -> Path:
    """Where the user's copy of the plugin config lives (``INFEROS_CONFIG_DIR``, else the platform's)."""
    env = os.environ.get("INFEROS_CONFIG_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir("inferos"))


def user_config_path() -> Path:
    return user_config_dir() / "plugin.toml"


def shipped_config_path() -> Path:
    return Path(str(importlib.resources.files("lemonade_inferos") / "plugin.toml"))


@dataclass
class Layer:
    """One source of settings: its name (a file, a variable, an option), its keys, and its text for line numbers."""

    source: str
    data: dict[str, Any]
    text: str | None = None


def normalize(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Short forms and top-level policy sections moved where the model has them; dashes become underscores."""
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        path = SHORT_FORMS.get(key) or (("policy", key) if key in POLICY_SECTIONS else (key,))
        if isinstance(value, Mapping) and key in ("policy", "loops", "quality_schedule", "notifications", "guard"):
            value = {str(k).replace("-", "_"): v for k, v in value.items()}
        out = deep_merge(out, _nest(path, value))
    return out


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def dotted(assignments: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kv.mode": "dynamic"}`` -> ``{"kv": {"mode": "dynamic"}}``."""
    out: dict[str, Any] = {}
    for key, value in assignments.items():
        out = deep_merge(out, _nest(tuple(part for part in key.split(".") if part), value))
    return out


def plugin_file_layer(path: Path) -> Layer | None:
    """``[plugin.config]`` of a plugin.toml (a user copy may also be a bare table of settings)."""
    if not path.is_file():
        return None
    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}", str(path), getattr(exc, "lineno", None)) from exc
    section = data.get("plugin", {}).get("config", {}) if isinstance(data.get("plugin"), dict) else data
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [plugin.config] must be a table", str(path), None, "plugin.config")
    return Layer(str(path), normalize(section, str(path)), text)


def config_file_layer(path: Path) -> Layer:
    """The ``--config`` document: its ``infer_os`` section (policy and loops)."""
    section, text = load_document(path)
    return Layer(str(path), normalize(section, str(path)), text)


def env_layer(environ: Mapping[str, str]) -> Layer | None:
    """``INFEROS_<KEY>`` variables naming a setting; others (INFEROS_HOME, INFEROS_AGENT_TOKEN, ...) are not
    settings and are left alone."""
    known = set(InferosSettings.model_fields) | POLICY_SECTIONS | set(SHORT_FORMS)
    data: dict[str, Any] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = ENV_ALIASES.get(name[len(ENV_PREFIX):], name[len(ENV_PREFIX):].lower())
        parts = key.split("__")
        if parts[0] in known:
            data = deep_merge(data, _nest(tuple(parts), value))
    return Layer(ENV_LAYER, normalize(data, "environment"), None) if data else None


@dataclass
class SettingsSources:
    """The layers of one plugin instance; :meth:`load` merges and validates them (again on every reload)."""

    options: dict[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] | None = None
    shipped_path: Path | None = None
    user_path: Path | None = None
    use_files: bool = True

    config_path: Path | None = field(default=None, init=False)   # the --config file, as of the last read
    layer_sources: list[str] = field(default_factory=list, init=False)   # the layers read last, in order

    def watched_paths(self) -> list[Path]:
        """The files whose edits are reloaded (no file is read to answer)."""
        paths = [p for p in (self._shipped(), self._user()) if p is not None]
        if self.config_path is not None:
            paths.append(self.config_path)
        return paths

    def layers(self) -> list[Layer]:
        """The layers in order, files read now; the ``--config`` file is the one the others name (option,
        environment, plugin file)."""
        files = [layer for layer in (plugin_file_layer(self._shipped()) if self._shipped() else None,
                                     plugin_file_layer(self._user()) if self._user() else None) if layer]
        env = env_layer(self._environ())
        after = [*([env] if env else []), Layer(OPTIONS_LAYER, normalize(dotted(self.options), OPTIONS_LAYER))]
        named: dict[str, Any] = {}
        for layer in (*files, *after):
            named = deep_merge(named, layer.data)
        self.config_path = Path(named["config"]) if named.get("config") else None
        config = [config_file_layer(self.config_path)] if self.config_path is not None else []
        layers = [*files, *config, *after]
        self.layer_sources = [layer.source for layer in layers]
        return layers

    def load(self) -> InferosSettings:
        """The settings from every layer.

        Raises:
            ConfigError: a layer cannot be read or holds a bad value (its source, line and field are named).
        """
        merged: dict[str, Any] = {}
        settings = InferosSettings()
        for layer in self.layers():
            merged = deep_merge(merged, layer.data)
            try:
                settings = InferosSettings.model_validate(merged)
            except ValidationError as exc:
                raise _layer_error(exc, layer) from exc
        return settings

    def _shipped(self) -> Path | None:
        return (self.shipped_path or shipped_config_path()) if self.use_files else None

    def _user(self) -> Path | None:
        return (self.user_path or user_config_path()) if self.use_files else None

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


def _layer_error(exc: ValidationError, layer: Layer) -> ConfigError:
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    shown = loc[1:] if loc and loc[0] == "policy" else loc  # policy fields are named as users write them
    name = ".".join(map(str, shown))
    line = line_of(layer.text, loc) if layer.text else None
    where = f"{layer.source}:{line}" if line else layer.source
    value = first.get("input")
    if layer.source == ENV_LAYER:
        where = f"environment variable {ENV_PREFIX}{'__'.join(map(str, shown)).upper()}"
    elif layer.source == OPTIONS_LAYER:
        where = f"plugin option {name}"
    else:
        where = f"{where}: {name}"
    return ConfigError(f"{where}: {first['msg']} (got {value!r})", layer.source, line, name)
