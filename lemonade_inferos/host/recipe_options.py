"""Per-model recipe options (Lemonade's ``recipe_options.json`` and ``/models/{id}/options``).

Lemonade resolves a load's options through layers: the ``/load`` request > the model's saved entry > the
server's start-up settings > the recipe's defaults. The ``oga-*`` recipes this host serves take one option,
``ctx_size`` (a positive size, or ``-1`` for "automatic": the model's own context length, even when the server
was started with ``--ctx-size``). Saving validates first, so a bad value is a 400 and nothing is written; a
damaged file is quarantined and read as empty (the saved options are lost, not the server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from lemonade_inferos.durable import atomic_write, read_json_object
from lemonade_inferos.errors import RequestError, validation_problems
from lemonade_inferos.paths import inferos_home

AUTO_CTX = -1


class OgaOptions(BaseModel):
    """What the ``oga-*`` recipes accept, on ``/load`` and ``/models/{id}/options``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ctx_size: int | None = None

    @field_validator("ctx_size")
    @classmethod
    def _size_or_auto(cls, value: int | None) -> int | None:
        if value is not None and value != AUTO_CTX and value < 16:
            raise ValueError("ctx_size is a context length of at least 16 tokens, or -1 for automatic sizing")
        return value


def validated(changes: dict[str, Any], recipe: str) -> dict[str, Any]:
    """``changes`` checked against the recipe's options (``None`` values stay: they remove a saved key).

    Raises:
        RequestError: an unknown option, an option of another recipe, or a value of the wrong type.
    """
    try:
        OgaOptions.model_validate({k: v for k, v in changes.items() if v is not None})
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise RequestError(f"recipe options for {recipe} rejected: "
                           + "; ".join(f"{p['field']}: {p['problem']}" for p in problems),
                           problems=problems, accepted=sorted(OgaOptions.model_fields)) from None
    return changes


class RecipeOptionsStore:
    """``INFEROS_HOME/recipe_options.json``: model name -> the options saved for it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or inferos_home() / "recipe_options.json"

    def _all(self) -> dict[str, dict[str, Any]]:
        data = read_json_object(self.path) or {}
        return {name: entry for name, entry in data.items() if isinstance(entry, dict)}

    def saved(self, name: str) -> dict[str, Any]:
        return dict(self._all().get(name, {}))

    def save(self, name: str, recipe: str, changes: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Merge ``changes`` into the model's entry (``None`` removes a key); the entry as it would be."""
        changes = validated({k: v for k, v in changes.items() if k not in ("model_name", "dry_run")}, recipe)
        everything = self._all()
        entry = {**everything.get(name, {}), **changes}
        entry = {k: v for k, v in entry.items() if v is not None}
        if not dry_run:
            everything[name] = entry
            self._write(everything)
        return entry

    def reset(self, name: str) -> None:
        everything = self._all()
        if everything.pop(name, None) is not None:
            self._write(everything)

    def _write(self, everything: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.path, json.dumps({k: v for k, v in everything.items() if v}, indent=2))


def resolve_ctx(requested: int | None, saved: dict[str, Any], server_ctx: int | None,
                model_ctx: int | None) -> int | None:
    """The context length a load uses: request > saved > server > the model's own (``-1``: the model's own);
    never more than the model supports. ``None`` when it depends on a model not built yet."""
    choice = requested if requested is not None else saved.get("ctx_size", server_ctx)
    if choice is None or choice == AUTO_CTX:
        return model_ctx
    return min(choice, model_ctx) if model_ctx else choice


def options_document(name: str, recipe: str, saved: dict[str, Any], server_ctx: int | None,
                     model_ctx: int | None, pending: dict[str, Any] | None = None) -> dict[str, Any]:
    """``GET /models/{id}/options``: saved, effective and default options, each a complete ``/load`` body."""
    defaults = {"model_name": name, "ctx_size": server_ctx if server_ctx is not None else AUTO_CTX}
    layered = pending if pending is not None else saved
    effective = {**defaults, **{k: v for k, v in layered.items() if k in OgaOptions.model_fields}}
    return {"model_name": name, "recipe": recipe, "saved": saved, "effective": effective, "defaults": defaults,
            "resolved_ctx_size": resolve_ctx(effective["ctx_size"], {}, None, model_ctx)}
