"""An onnxruntime-genai model folder, read from its ``genai_config.json``.

Every engine (ours and the og.Generator baseline) starts from this: the folder
is validated once, here, so a missing file or a malformed config fails with a
message naming the file instead of deep inside ONNX Runtime.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lemonade_inferos.errors import ModelFolderError

CONFIG_NAME = "genai_config.json"


@dataclass(frozen=True)
class SearchDefaults:
    """The ``search`` section: generation defaults the model author chose."""

    max_length: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ModelFolder:
    """What the engine needs to know about a model, read from its folder.

    Name patterns (``past_key_values.%d.key``) are kept as patterns and
    expanded per layer, exactly as onnxruntime-genai does.
    """

    path: Path
    model_type: str
    filename: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    input_names: dict[str, str]
    output_names: dict[str, str]
    search: SearchDefaults
    session_options: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    sliding_window: int = 0   # tokens its local layers attend to (Gemma 2/3, Mistral); 0: every layer is global
    local_layers: tuple[int, ...] = ()   # the layers that attend to that window

    @property
    def onnx_path(self) -> Path:
        return self.path / self.filename

    def past_key_name(self, layer: int) -> str:
        return self.input_names["past_key_names"] % layer

    def past_value_name(self, layer: int) -> str:
        return self.input_names["past_value_names"] % layer

    def present_key_name(self, layer: int) -> str:
        return self.output_names["present_key_names"] % layer

    def present_value_name(self, layer: int) -> str:
        return self.output_names["present_value_names"] % layer

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies weights and graph for cache keys by content, not place: the same model in another folder
        or on another machine has the same fingerprint (servers sharing a prefix store find each other's blocks),
        a rebuilt or fine-tuned one another."""
        return f"{self.filename}:{content_fingerprint(self.onnx_path)}"


def content_fingerprint(onnx_path: Path, head_bytes: int = 16 * 2**20, samples: int = 32,
                        sample_bytes: int = 64 * 2**10) -> str:
    """What identifies a model's weights and graph wherever its folder lies (a copy on another machine, a folder
    of symlinks): the graph file's size and first 16 MiB, and its external data files' sizes and 32 samples of
    64 KiB spread through each (a fine-tune of the same architecture differs there). Reads ~18 MiB."""
    digest = hashlib.blake2b(digest_size=16)
    with onnx_path.open("rb") as fh:
        digest.update(fh.read(head_bytes))
    digest.update(str(onnx_path.stat().st_size).encode())
    for data in sorted(onnx_path.parent.glob(onnx_path.name + ".data*")):
        size = data.stat().st_size
        digest.update(f"{data.name}:{size}".encode())
        with data.open("rb") as fh:
            for i in range(samples):
                fh.seek(max(0, size - sample_bytes) * i // max(1, samples - 1))
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()


def _require(section: dict[str, Any], key: str, where: str, config_path: Path) -> Any:
    if key not in section:
        raise ModelFolderError(
            f"{config_path}: missing required key '{where}.{key}'. "
            "Rebuild the folder with `inferos model build` or fix the file.",
            file=str(config_path),
            key=f"{where}.{key}",
        )
    return section[key]


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def load_model_folder(path: str | Path) -> ModelFolder:
    """Read and validate a model folder.

    Args:
        path: a folder holding ``genai_config.json`` and the ONNX file it names.

    Returns:
        The parsed :class:`ModelFolder`.

    Raises:
        ModelFolderError: the folder, config or ONNX file is missing or malformed;
            the message names the file.
    """
    folder = Path(path).expanduser()
    config_path = folder / CONFIG_NAME
    raw = _read_config(folder, config_path)
    folder_spec = _parse_config(folder, config_path, raw)
    for key in ("input_ids", "attention_mask", "past_key_names", "past_value_names"):
        _require(folder_spec.input_names, key, "model.decoder.inputs", config_path)
    for key in ("logits", "present_key_names", "present_value_names"):
        _require(folder_spec.output_names, key, "model.decoder.outputs", config_path)
    if not folder_spec.onnx_path.is_file():
        raise ModelFolderError(
            f"{folder_spec.onnx_path} not found (named by model.decoder.filename in {config_path})",
            file=str(folder_spec.onnx_path),
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(f"{folder / 'tokenizer.json'} not found: the tokenizer must ship with the model",
                               file=str(folder / "tokenizer.json"))
    return folder_spec


def _read_config(folder: Path, config_path: Path) -> dict:
    """``genai_config.json`` as an object; a missing folder or file, or a file that is not a JSON object, is a
    ModelFolderError naming it."""
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}", file=str(folder))
    if not config_path.is_file():
        raise ModelFolderError(
            f"{config_path} not found: an onnxruntime-genai model folder needs a {CONFIG_NAME}",
            file=str(config_path),
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{config_path} is not valid JSON: {exc}", file=str(config_path)) from exc
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{config_path}: top level must be an object", file=str(config_path))
    return raw


def _parse_config(folder: Path, config_path: Path, raw: dict) -> ModelFolder:
    """The fields a model folder needs out of its config; a missing or malformed one names the key."""
    model = _require(raw, "model", "", config_path)
    decoder = _require(model, "decoder", "model", config_path)
    search = raw.get("search", {})
    try:
        return ModelFolder(
            path=folder,
            model_type=str(model.get("type", "unknown")),
            filename=str(_require(decoder, "filename", "model.decoder", config_path)),
            num_layers=int(_require(decoder, "num_hidden_layers", "model.decoder", config_path)),
            num_attention_heads=int(_require(decoder, "num_attention_heads", "model.decoder", config_path)),
            num_kv_heads=int(_require(decoder, "num_key_value_heads", "model.decoder", config_path)),
            head_size=int(_require(decoder, "head_size", "model.decoder", config_path)),
            hidden_size=int(decoder.get("hidden_size", 0)),
            vocab_size=int(_require(model, "vocab_size", "model", config_path)),
            context_length=int(_require(model, "context_length", "model", config_path)),
            bos_token_id=model.get("bos_token_id"),
            eos_token_ids=_as_int_tuple(model.get("eos_token_id")),
            pad_token_id=model.get("pad_token_id"),
            input_names=dict(_require(decoder, "inputs", "model.decoder", config_path)),
            output_names=dict(_require(decoder, "outputs", "model.decoder", config_path)),
            search=SearchDefaults(
                max_length=int(search.get("max_length", model.get("context_length", 2048))),
                do_sample=bool(search.get("do_sample", False)),
                temperature=float(search.get("temperature", 1.0)),
                top_k=int(search.get("top_k", 50)),
                top_p=float(search.get("top_p", 1.0)),
                repetition_penalty=float(search.get("repetition_penalty", 1.0)),
            ),
            session_options=dict(decoder.get("session_options", {})),
            raw=raw,
            sliding_window=int((decoder.get("sliding_window") or {}).get("window_size", 0) or 0),
            local_layers=_as_int_tuple((decoder.get("sliding_window") or {}).get("layers")),
        )
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{config_path}: malformed value: {exc}", file=str(config_path)) from exc


def initializer_array(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """An initializer's values, reading external data through symlinks.

    onnx refuses external data behind a symbolic link, and the Hugging Face cache (where Lemonade keeps its
    OGA models) is made of them; so the bytes are read here, from the location named in the tensor, which
    must stay inside ``folder``.
    """
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = Path(info["location"])
    if location.is_absolute() or ".." in location.parts:
        raise ValueError(f"initializer {tensor.name}: external data outside the model folder ({location})")
    with (folder / location).open("rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        raw = fh.read(int(info["length"])) if "length" in info else fh.read()
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return numpy_helper.to_array(inline)
