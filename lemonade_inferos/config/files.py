"""Config files: the design document's YAML (``infer_os:`` root) or a TOML twin, with hot reload.

    infer_os:
      quality: {max_delta_ppl: 0.5, min_accept_rate: 0.5}
      kv: {mode: dynamic, recent_window: 64, level_thresholds: {L1_int8: 0.7, L2_int4: 0.5, L3_evict: 0.3}}
      io: {enable_iobinding: true, dml_pool_bytes: 2048MiB, host_pool_bytes: 4096MiB}
      scheduler: {mode: hybrid, prefill_device: dml, decode_device: npu}
      loops: {fast_ms: 1, mid_ms: 10, slow_ms: 100}

A changed file is validated before it replaces the running config (the controller's slow loop checks it,
``controller.py``); a bad edit is rejected with the line (syntax) or field (schema) named, and the old config
stays in force.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lemonade_inferos.config.policy import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)
MAX_DEPTH = 32   # how deep a config document may nest (the policy itself is ~4 deep)

def _presets_dir() -> Path:
    """``configs/`` of a source checkout (editable install), else the copy a wheel puts under share/."""
    for candidate in (Path(__file__).resolve().parents[2] / "configs",
                      Path(sys.prefix) / "share" / "lemonade-inferos" / "configs"):
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "configs"


PRESETS_DIR = _presets_dir()


class LoopsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fast_ms: int = Field(1, ge=1)
    mid_ms: int = Field(10, ge=1)
    slow_ms: int = Field(100, ge=1)


class InferOSConfig(BaseModel):
    """The ``infer_os`` section: the policy plus the controller's loop periods."""

    model_config = ConfigDict(extra="forbid")
    policy: Policy = Field(default_factory=Policy)
    loops: LoopsConfig = Field(default_factory=LoopsConfig)

    def to_document(self) -> dict[str, Any]:
        return {"infer_os": {**self.policy.model_dump(), "loops": self.loops.model_dump()}}


class ConfigError(ValueError):
    """A config document that cannot be used; the message names the line or the field."""

    def __init__(self, message: str, source: str, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.source, self.line, self.field = source, line, field

    def details(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "field": self.field}


class ConfigSyntaxError(ConfigError):
    """A document that is not readable YAML or TOML (``fmt`` says which): syntax, or nested too deep."""

    def __init__(self, message: str, source: str, fmt: str, line: int | None = None) -> None:
        super().__init__(message, source, line)
        self.fmt = fmt


def parse_document(text: str, source: str, fmt: str | None = None) -> dict[str, Any]:
    """The ``infer_os`` section of a YAML or TOML document, unvalidated.

    Raises:
        ConfigError: a syntax error (with its line), or no ``infer_os:`` mapping at the root.
    """
    fmt = fmt or ("toml" if source.endswith(".toml") else "yaml")
    try:
        data = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigSyntaxError(f"{source}:{line}: YAML syntax error: {exc.problem}", source, fmt, line) from exc
    except yaml.YAMLError as exc:  # e.g. a control character: the reader names its position
        mark = getattr(exc, "position", None)
        line = text.count("\n", 0, mark) + 1 if isinstance(mark, int) else None
        raise ConfigSyntaxError(f"{source}:{line}: YAML cannot read this document: {exc}", source, fmt, line) \
            from exc
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        raise ConfigSyntaxError(f"{source}: TOML syntax error: {exc}", source, fmt, line) from exc
    except RecursionError as exc:  # both readers recurse per nesting level
        raise ConfigSyntaxError(f"{source}: nested too deep to read as {fmt.upper()}", source, fmt) from exc
    if _depth(data) > MAX_DEPTH:  # the policy is ~4 deep; deeper structures only cost the walks after this
        raise ConfigSyntaxError(f"{source}: nested deeper than {MAX_DEPTH} levels", source, fmt)
    if not isinstance(data, dict) or not isinstance(data.get("infer_os"), dict):
        raise ConfigError(f"{source}: the document needs an 'infer_os:' mapping at its root", source, 1, "infer_os")
    return dict(data["infer_os"])


def _depth(value: Any) -> int:
    """How deep mappings and lists nest in ``value``, up to ``MAX_DEPTH + 1``: iterative, and a subtree that YAML
    aliases share is walked once per depth (not once per path, which is exponential in a "billion laughs")."""
    deepest, stack, seen = 0, [(value, 1)], set()
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and (id(node), depth) not in seen:
            seen.add((id(node), depth))
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_config(text: str, source: str, fmt: str | None = None) -> InferOSConfig:
    """Parse and validate a YAML or TOML config document.

    Raises:
        ConfigError: a syntax error (with its line) or an invalid field (with its dotted path).
    """
    section = parse_document(text, source, fmt)
    loops = section.pop("loops", {}) or {}
    try:
        policy = Policy.model_validate(section)
    except ValidationError as exc:
        raise _field_error(exc, "infer_os", text, source) from exc
    try:
        loop_config = LoopsConfig.model_validate(loops)
    except ValidationError as exc:
        raise _field_error(exc, "infer_os.loops", text, source) from exc
    return InferOSConfig(policy=policy, loops=loop_config)


def _field_error(exc: ValidationError, prefix: str, text: str, source: str) -> ConfigError:
    first = exc.errors()[0]
    field = ".".join([prefix, *map(str, first["loc"])])
    line = line_of(text, first["loc"])
    where = f"{source}:{line}" if line else source
    return ConfigError(f"{where}: {field}: {first['msg']}", source, line, field)


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best effort: the line where the last key of ``loc`` appears in the document."""
    key = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    if key is None:
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith(f"{key}:") or stripped.startswith(f"{key} =") or stripped.startswith(f"{key}="):
            return number
    return None


def read_text(path: Path) -> str:
    """A config file's text. Raises ConfigError for anything wrong with it, bytes included."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}", str(path)) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
                          str(path), line) from exc


def load_document(path: Path) -> tuple[dict[str, Any], str]:
    """A config file's ``infer_os`` section (unvalidated) and its text."""
    text = read_text(path)
    return parse_document(text, str(path)), text


def load_config(path: Path) -> InferOSConfig:
    """Read and validate a config file. Raises ConfigError for anything wrong with it, bytes included."""
    return parse_config(read_text(path), str(path))


def preset_path(name: str) -> Path:
    """A shipped preset by name (file stem in ``configs/``)."""
    for suffix in (".yaml", ".toml"):
        candidate = PRESETS_DIR / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise ValueError(f"unknown preset '{name}'; available: {sorted(p.stem for p in PRESETS_DIR.glob('*.yaml'))}")
