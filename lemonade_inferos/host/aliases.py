"""Model aliases (Lemonade's ``/internal/aliases``): a name that stands in for its target in any request's
``model`` field, kept in ``INFEROS_HOME/aliases.json`` (Lemonade keeps ``<cache_dir>/aliases.json``).

An alias may point at another alias; a change that would make a chain loop is refused, and so is an alias that
is already a model's name (it would hide the model) or that takes one of Lemonade's reserved prefixes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.errors import InferosError, RequestError
from lemonade_inferos.paths import inferos_home

RESERVED_PREFIXES = ("user.", "extra.", "builtin.")
MAX_CHAIN = 32   # an alias chain longer than this is treated as a loop (a file edited by hand may hold one)


class AliasConflict(InferosError):
    """The alias would hide a model or make a chain loop (Lemonade: 409)."""

    code = "alias_conflict"


class ModelAliases:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or inferos_home() / "aliases.json"
        self._lock = threading.Lock()

    def all(self) -> dict[str, str]:
        """alias -> target; a damaged file is quarantined (the aliases are lost, not the server)."""
        if not self.path.is_file():
            return {}
        try:
            aliases = json.loads(self.path.read_bytes().decode("utf-8"))
            if isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in aliases.items()):
                return aliases
            reason = "not a mapping of alias names to model names"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = f"unreadable: {exc}"
        quarantine(self.path, reason)
        return {}

    def resolve(self, name: str) -> str:
        """The model ``name`` stands for: itself when it is no alias, else its chain's end."""
        aliases = self.all()
        for _ in range(MAX_CHAIN):
            if name not in aliases:
                return name
            name = aliases[name]
        raise RequestError(f"the alias chain from '{name}' does not end: fix {self.path}", model=name)

    def set(self, alias: str, target: str, model_names: set[str]) -> None:
        """Point ``alias`` at ``target``; ``model_names`` are the registry's (an alias may not hide one)."""
        if not alias or not target:
            raise RequestError("alias and target are required", param="alias" if not alias else "target")
        if alias == target:
            raise RequestError(f"alias '{alias}' cannot point at itself", param="alias")
        if alias.startswith(RESERVED_PREFIXES):
            raise RequestError(f"alias '{alias}' takes a reserved prefix ({', '.join(RESERVED_PREFIXES)})",
                               param="alias")
        if alias in model_names:
            raise AliasConflict(f"'{alias}' is a model's name: an alias cannot hide it", alias=alias)
        with self._lock:
            aliases = self.all()
            name, seen = target, {alias}
            while name in aliases:
                if name in seen:
                    break
                seen.add(name)
                name = aliases[name]
            if name in seen:
                raise AliasConflict(f"alias '{alias}' -> '{target}' would make a loop of aliases", alias=alias,
                                    target=target)
            aliases[alias] = target
            self._save(aliases)

    def remove(self, alias: str) -> bool:
        """Remove ``alias``; False when there is none."""
        with self._lock:
            aliases = self.all()
            if aliases.pop(alias, None) is None:
                return False
            self._save(aliases)
            return True

    def _save(self, aliases: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
