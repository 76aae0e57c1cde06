"""The model registry, in Lemonade's ``server_models.json`` shape.

Built-in models build offline from a packaged GGUF (``pull`` builds them);
``user.NAME`` models point at a local onnxruntime-genai folder, or at a folder built once from a local GGUF file
(``pull user.NAME --checkpoint FILE.gguf``, Lemonade's ``llamacpp`` recipe), and are kept in
``INFEROS_HOME/user_models.json``. Lemonade's OGA recipes are accepted: here
everything runs on ``oga-cpu``; ``oga-hybrid``/``oga-npu``/``oga-igpu`` fall
back to CPU with a logged reason when their provider is missing. A ``user.NAME``
router collection (``collection.router``) is kept there too: it has no folder,
its requests go to the candidate its policy picks (``route_dispatch.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lemonade_inferos.engine.build import BuildSpec, build_model, gguf_build_name, is_built
from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.errors import InferosError, ModelNotFoundError, RequestError
from lemonade_inferos.host.aliases import ModelAliases
from lemonade_inferos.host.extra_models import EXTRA_PREFIX, GGUF_RECIPE, configured_folder, extra_models
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

RECIPE_PROVIDER = {"oga-cpu": "CPUExecutionProvider", "oga-igpu": "DmlExecutionProvider",
                   "oga-hybrid": "DmlExecutionProvider", "oga-npu": "VitisAIExecutionProvider"}
ROUTER_RECIPE = "collection.router"
RECIPE_DEVICES = {"oga-cpu": ["cpu"], "oga-igpu": ["dml", "cpu"], "oga-hybrid": ["npu", "dml", "cpu"],
                  "oga-npu": ["npu", "cpu"]}

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M-Instruct-CPU": {
        "checkpoint": "smollm2-135m", "build": {"model": "smollm2-135m", "weights": "fp32", "kv": "fp32"},
        "recipe": "oga-cpu", "suggested": True, "size": 0.54, "labels": ["llm"],
    },
    "SmolLM2-135M-Instruct-INT4-CPU": {
        "checkpoint": "smollm2-135m-int4", "build": {"model": "smollm2-135m", "weights": "int4", "kv": "fp32"},
        "recipe": "oga-cpu", "suggested": True, "size": 0.2, "labels": ["llm"],
    },
    "Gemma-3-270M-CPU": {   # the base model (its GGUF has no chat template): completions, perplexity, benchmarks
        "checkpoint": "gemma3-270m-int4", "build": {"model": "gemma3-270m", "weights": "int4", "kv": "fp32"},
        "recipe": "oga-cpu", "suggested": False, "size": 0.27, "labels": ["llm"],
    },
}


class ModelRegistry:
    def __init__(self, user_models_path: Path | None = None, aliases: ModelAliases | None = None,
                 extra_models_dir: Path | None = None) -> None:
        self.user_models_path = user_models_path or inferos_home() / "user_models.json"
        self.aliases = aliases or ModelAliases(self.user_models_path.parent / "aliases.json")
        self.extra_models_dir = extra_models_dir or configured_folder()   # extra.NAME GGUFs (extra_models.py)

    def _user_models(self) -> dict[str, dict[str, Any]]:
        """``user.*`` registrations; a damaged file is quarantined (the registrations are lost, not the server)."""
        path = self.user_models_path
        if not path.is_file():
            return {}
        try:
            models = json.loads(path.read_bytes().decode("utf-8"))
            if isinstance(models, dict) and all(isinstance(v, dict) and isinstance(v.get("checkpoint"), str)
                                                for v in models.values()):
                return models
            reason = "not a mapping of model names to registrations"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = f"unreadable: {exc}"
        quarantine(path, reason)
        return {}

    def all(self) -> dict[str, dict[str, Any]]:
        """Every model by name: built-in, ``extra.*``, then ``user.*``."""
        models = {name: {"model_name": name, **info} for name, info in BUILTIN_MODELS.items()}
        models.update({name: {"model_name": name, **info}
                       for name, info in extra_models(self.extra_models_dir).items()})
        models.update({name: {"model_name": name, **info} for name, info in self._user_models().items()})
        return models

    def canonical(self, name: str) -> str:
        """Lemonade's name prefixes: ``builtin.NAME`` is the built-in NAME. A ``:latest`` tag is ignored, as
        Lemonade does, and an alias (``aliases.py``) stands for its target.

        Raises:
            ModelNotFoundError: ``builtin.`` before a name that is not built in.
        """
        name = self.aliases.resolve(name.removesuffix(":latest"))   # Ollama's default tag: the model itself
        if name.startswith("builtin."):
            base = name.removeprefix("builtin.")
            if base not in BUILTIN_MODELS:
                raise ModelNotFoundError(f"'{name}': no built-in model {base!r}; built-in: {sorted(BUILTIN_MODELS)}",
                                         model=name)
            return base
        return name

    def get(self, name: str) -> dict[str, Any]:
        name = self.canonical(name)
        models = self.all()
        if name not in models:
            raise ModelNotFoundError(f"model '{name}' is not in the registry; available: {sorted(models)}",
                                     model=name)
        return models[name]

    def router_policy(self, name: str) -> dict[str, Any] | None:
        """The policy document of a registered router collection, None for any other name (built-in names and
        unknown ones cost no file read)."""
        if not name.startswith("user."):
            return None
        info = self._user_models().get(name)
        return info.get("policy") if info and info.get("recipe") == ROUTER_RECIPE else None

    def is_downloaded(self, name: str) -> bool:
        info = self.get(name)
        if info.get("recipe") == ROUTER_RECIPE:   # usable once every model it may use is
            return all(c in self.all() and self.is_downloaded(c) for c in info.get("components", []))
        if name.startswith(EXTRA_PREFIX):   # a local file: usable (converted at its first load)
            return Path(info["source"]).is_file()
        if "build" in info:
            return is_built(BuildSpec(**info["build"]))
        return Path(info["checkpoint"]).is_dir()

    def is_ready(self, name: str) -> bool:
        """Downloaded and, where it is built from a GGUF, built: a load needs no pull first."""
        info = self.get(name)
        return is_built(BuildSpec(**info["build"])) if "build" in info else self.is_downloaded(name)

    def folder(self, name: str) -> Path:
        info = self.get(name)
        if info.get("recipe") == ROUTER_RECIPE:
            raise RequestError(f"'{name}' is a router collection: it has no model folder, and a request naming it "
                               f"runs on the candidate its policy picks ({', '.join(info.get('components', []))})",
                               model=name)
        if "build" in info:
            spec = BuildSpec(**info["build"])
            if not is_built(spec):
                raise ModelNotFoundError(f"model '{name}' is not pulled yet: lemonade-server pull {name}",
                                         model=name)
            return spec.output_dir
        return Path(info["checkpoint"])

    def context_length(self, name: str) -> int | None:
        """The longest context the model supports (its genai_config), or None while it is not built or unreadable."""
        try:
            return load_model_folder(self.folder(name)).context_length if self.is_downloaded(name) else None
        except InferosError:
            return None

    def pull(self, name: str, checkpoint: str | None = None, recipe: str | None = None,
             progress=lambda msg: None) -> Path:
        """Build a built-in model offline, or register a local OGA folder as ``user.NAME``."""
        name = self.canonical(name)
        built = BUILTIN_MODELS.get(name) or extra_models(self.extra_models_dir).get(name)
        if built is not None:   # a built-in model, or an extra.NAME GGUF: converted here
            folder = build_model(BuildSpec(**built["build"]), progress)
            calibrate_after_pull(folder, progress)
            return folder
        if not name.startswith("user."):
            raise ModelNotFoundError(f"'{name}' is not a built-in model; register a local folder as 'user.{name}' "
                                     "with a checkpoint path", model=name)
        registered = self._user_models().get(name)
        if not checkpoint and registered is not None and not registered.get("source"):
            return self.folder(name)   # a registered folder: nothing to fetch
        if not checkpoint and registered is not None:   # a registered GGUF: its build verified, or made again
            folder = self._built_from(name, Path(registered["source"]), progress)   # (by an older converter)
            calibrate_after_pull(folder, progress)
            return folder
        if not checkpoint:
            raise RequestError(f"pulling {name} needs a checkpoint: the path of an onnxruntime-genai model folder "
                               "or of a GGUF file", model=name)
        source = Path(checkpoint).expanduser().resolve()
        gguf = source if source.is_file() else None
        recipe = recipe or (GGUF_RECIPE if gguf else "oga-cpu")
        if recipe not in RECIPE_PROVIDER and not (gguf and recipe == GGUF_RECIPE):
            raise RequestError(f"recipe '{recipe}' is not served here; use one of {sorted(RECIPE_PROVIDER)}"
                               f"{' or ' + GGUF_RECIPE if gguf else ''}", recipe=recipe)
        folder = self._built_from(name, gguf, progress) if gguf else source
        load_model_folder(folder)  # validate before registering
        models = self._user_models()
        models[name] = {"checkpoint": str(folder), "recipe": recipe, "suggested": False,
                        "size": round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e9, 3),
                        "labels": ["llm", "custom"], **({"source": str(gguf)} if gguf else {})}
        self._save(models)
        calibrate_after_pull(folder, progress)
        return folder

    @staticmethod
    def _built_from(name: str, gguf: Path, progress) -> Path:
        """``user.NAME``'s GGUF converted once into an int4 folder of the model cache (``user-name-int4``)."""
        try:
            spec = BuildSpec(gguf_build_name("user", name[len("user."):]), "int4", gguf=str(gguf))
        except ValueError as exc:
            raise RequestError(str(exc), model=name) from exc
        return build_model(spec, progress)

    def register_router(self, name: str, policy: dict[str, Any], components: list[str]) -> None:
        """Keep a router collection (its policy checked by the caller) as ``user.NAME``; registering a name again
        replaces its policy."""
        models = self._user_models()
        if name in models and models[name].get("recipe") != ROUTER_RECIPE:
            raise RequestError(f"'{name}' is a registered model folder, not a router collection: delete it first",
                               model=name)
        models[name] = {"checkpoint": "", "recipe": ROUTER_RECIPE, "components": components, "policy": policy,
                        "suggested": False, "size": 0, "labels": ["router"]}
        self._save(models)

    def delete(self, name: str) -> None:
        name = self.canonical(name)
        info = self.get(name)
        if "build" in info:
            shutil.rmtree(BuildSpec(**info["build"]).output_dir, ignore_errors=True)
            return
        models = self._user_models()
        removed = models.pop(name, None) or {}
        self._save(models)
        if removed.get("source"):   # a GGUF's folder is ours to remove; a registered folder is the user's
            shutil.rmtree(removed["checkpoint"], ignore_errors=True)

    def _save(self, models: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.user_models_path, json.dumps(models, indent=2))


def calibrate_after_pull(folder: Path, progress=lambda msg: None) -> None:
    """Calibrate a pulled model's INT8 live KV scales now, so its first request does not wait for them; a failure is
    reported and left to the server (it calibrates in the background at the first load)."""
    from lemonade_inferos.engine.prepare import prepare_live_int8  # onnxruntime: not for `list`

    def passages(done: int, total: int) -> None:
        progress(f"calibrating INT8 live KV scales: passage {done}/{total}")

    try:
        progress(prepare_live_int8(folder, ["cpu"], passages))
    except Exception as exc:
        log.warning("%s: INT8 live KV scales not calibrated (%s); the server calibrates them at first load", folder,
                    exc)
        progress(f"INT8 live KV scales not calibrated ({exc}); the server calibrates them at first load")


def devices_for_recipe(recipe: str) -> tuple[list[str], str | None]:
    """Devices to try for a recipe, and the reason when it falls back to CPU here."""
    devices = RECIPE_DEVICES.get(recipe, ["cpu"])
    provider = RECIPE_PROVIDER.get(recipe, "CPUExecutionProvider")
    from lemonade_inferos.engine.session import available_providers  # onnxruntime: not for `list`

    if provider not in available_providers():
        reason = f"recipe {recipe} wants {provider}, which this onnxruntime build lacks: running on CPU"
        log.warning(reason)
        return devices, reason
    return devices, None
