"""The one versioned policy: the settings in force, where they came from, and every change made to them.

The policy lives in one place, ``settings.policy``: ``POST /v1/policy``, ``POST /v1/config``, a hot reload of
the settings files and the sidecar agent all replace the settings through this store, which bumps the version
and says what needs a restart. Nothing else keeps a copy that could go stale.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from lemonade_inferos.config.files import ConfigError, InferOSConfig
from lemonade_inferos.config.policy import Policy
from lemonade_inferos.config.settings import InferosSettings, SettingsSources
from lemonade_inferos.engine.build import resolve_model
from lemonade_inferos.errors import InferosError

Notify = Callable[[dict[str, Any]], None]


def check_models(policy: Policy, source: str) -> None:
    """What the schema cannot know: a draft model named by the policy must exist (a folder, or a model built or
    buildable here). Raises ConfigError naming the field."""
    speculative = policy.speculative
    if speculative.mode != "draft" or not speculative.draft_model:
        return
    try:
        resolve_model(speculative.draft_model)
    except InferosError as exc:
        raise ConfigError(f"speculative.draft_model: {exc.message}", source, field="speculative.draft_model") \
            from exc


class PolicyStore:
    def __init__(self, sources: SettingsSources, settings: InferosSettings, notify: Notify) -> None:
        check_models(settings.policy, "settings")
        self._lock = threading.RLock()
        self.sources = sources
        self.settings = settings
        self.started = settings   # what the process started with (a changed start-only field needs a restart)
        self.version = 1
        self.source = "settings"
        self.error: dict[str, Any] | None = None
        self.restart_required: list[str] = []
        self._notify = notify

    @property
    def policy(self) -> Policy:
        return self.settings.policy

    @property
    def config(self) -> InferOSConfig:
        return self.settings.infer_os()

    def _replace(self, settings: InferosSettings, source: str) -> None:
        with self._lock:
            self.settings = settings
            self.version += 1
            self.source = source

    def update_policy(self, update: dict[str, Any], source: str) -> Policy:
        """Merge a partial policy; invalid updates raise and change nothing."""
        with self._lock:
            new = self.policy.merged(update)
            check_models(new, source)
            self._replace(self.settings.model_copy(update={"policy": new}), source)
        self._notify({"kind": "policy", "version": self.version, "update": update, "source": source})
        return new

    def apply_config(self, config: InferOSConfig, source: str) -> None:
        """A whole config document (``POST /v1/config``): policy and loops replaced."""
        check_models(config.policy, source)
        with self._lock:
            self._replace(self.settings.model_copy(update={"policy": config.policy, "loops": config.loops}), source)
            self.error = None
        self._notify({"kind": "config", "version": self.version, "source": source})

    def reject(self, error: ConfigError) -> None:
        self.error = {"message": str(error), **error.details(), "at": time.time()}
        self._notify({"kind": "config_rejected", **self.error})

    def load(self) -> InferosSettings:
        """Every settings layer read again now; a bad one is recorded, raises ConfigError and changes nothing."""
        try:
            settings = self.sources.load()
            check_models(settings.policy, "settings")
            return settings
        except ConfigError as exc:
            self.reject(exc)
            raise

    def apply_settings(self, settings: InferosSettings, source: str) -> InferosSettings:
        """Reloaded settings in force; returns the ones they replace (the caller applies what it holds)."""
        old = self.settings
        with self._lock:
            self._replace(settings, source)
            self.restart_required = settings.restart_fields(self.started)
            self.error = None
        return old


class FileWatcher:
    """The slow loop's hot reload: any watched file changed. A change is reported once the files' times have
    held for one more round, so a file caught half-written by a non-atomic save is not what gets judged."""

    def __init__(self, paths: Callable[[], list[Path]]) -> None:
        self._paths = paths
        self._mtimes = self._read()
        self._pending: dict[Path, int] | None = None

    def _read(self) -> dict[Path, int]:
        out = {}
        for path in self._paths():
            try:
                out[path] = path.stat().st_mtime_ns
            except OSError:
                continue
        return out

    def changed(self) -> list[str]:
        """The files changed since the last report, once their change has held a round (else nothing)."""
        mtimes = self._read()
        if mtimes == self._mtimes:
            self._pending = None
            return []
        if mtimes != self._pending:
            self._pending = mtimes   # seen once: report it at the next round if it still holds
            return []
        changed = sorted(str(p) for p in set(mtimes) | set(self._mtimes) if mtimes.get(p) != self._mtimes.get(p))
        self._mtimes, self._pending = mtimes, None
        return changed
