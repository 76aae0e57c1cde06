from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.errors import ModelFolderError


def _copy_light(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the folder's small files, with the model file linked rather than copied."""
    dst = tmp_path / "model"
    dst.mkdir()
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, dst / f.name)
        elif f.is_file():
            (dst / f.name).symlink_to(f)
    return dst


def test_reads_layout_from_genai_config(model_dir):
    folder = load_model_folder(model_dir)
    assert (folder.num_layers, folder.num_kv_heads, folder.head_size) == (30, 3, 64)
    assert folder.eos_token_ids == (2,)
    assert folder.past_key_name(7) == "past_key_values.7.key"
    assert folder.present_value_name(3) == "present.3.value"


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ModelFolderError, match="model folder not found"):
        load_model_folder(tmp_path / "nope")


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ModelFolderError, match="genai_config.json not found"):
        load_model_folder(tmp_path)


def test_corrupt_config_names_the_file(model_dir, tmp_path):
    folder = _copy_light(model_dir, tmp_path)
    (folder / "genai_config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"genai_config.json is not valid JSON"):
        load_model_folder(folder)


def test_missing_key_names_the_key(model_dir, tmp_path):
    folder = _copy_light(model_dir, tmp_path)
    config = json.loads((folder / "genai_config.json").read_text())
    del config["model"]["decoder"]["num_key_value_heads"]
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="model.decoder.num_key_value_heads"):
        load_model_folder(folder)


def test_missing_onnx_file_names_it(model_dir, tmp_path):
    folder = _copy_light(model_dir, tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="model.onnx not found"):
        load_model_folder(folder)
