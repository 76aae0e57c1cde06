"""A GGUF is judged by its header before anything is converted: not a GGUF, or an architecture the chain cannot
convert, is a clear error naming it, and nothing is built or registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from lemonade_inferos.engine.build import BuildSpec
from lemonade_inferos.engine.gguf_source import UnsupportedGGUFError, gguf_architecture
from lemonade_inferos.errors import InferosError
from lemonade_inferos.host.registry import ModelRegistry


def _gguf_of(arch: str, path: Path) -> Path:
    """A header-only GGUF of ``arch`` (no tensors: the check never reads them)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_file_that_is_not_a_gguf_is_refused_naming_it(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(UnsupportedGGUFError, match="model.gguf is not a readable GGUF file"):
        gguf_architecture(junk)


def test_an_architecture_the_chain_cannot_convert_is_refused_naming_it(tmp_path):
    with pytest.raises(UnsupportedGGUFError, match="holds a 'mamba' model") as caught:
        gguf_architecture(_gguf_of("mamba", tmp_path / "mamba.gguf"))
    assert caught.value.details["architecture"] == "mamba"
    assert gguf_architecture(_gguf_of("qwen3", tmp_path / "qwen3.gguf")) == "qwen3"


def test_a_gguf_build_needs_a_name_that_can_be_a_folder(tmp_path):
    for name in ("Has Spaces", "../up", "smollm2-135m", ""):
        with pytest.raises(ValueError):
            BuildSpec(name, "int4", gguf=str(tmp_path / "x.gguf"))
    assert BuildSpec("user-qwen3-0.6b", "int4", gguf=str(tmp_path / "x.gguf")).variant == "user-qwen3-0.6b-int4"


def test_pulling_a_damaged_or_unsupported_gguf_leaves_nothing_registered_or_built(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROS_HOME", str(tmp_path / "home"))
    registry = ModelRegistry()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\xff" * 64)   # the magic, then garbage
    for source in (damaged, _gguf_of("mamba", tmp_path / "mamba.gguf")):
        with pytest.raises(InferosError, match=source.name):
            registry.pull("user.Broken", checkpoint=str(source))
    assert "user.Broken" not in registry.all()
    models = tmp_path / "home" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_inferos_model_build_names_a_damaged_gguf_and_exits_1(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lemonade_inferos.cli.inferos import cli

    monkeypatch.setenv("INFEROS_HOME", str(tmp_path / "home"))
    damaged = tmp_path / "mine.gguf"
    damaged.write_bytes(b"\x00" * 256)
    result = CliRunner().invoke(cli, ["model", "build", "mine", "--gguf", str(damaged)])
    assert result.exit_code == 1 and "mine.gguf is not a readable GGUF file" in result.output
    result = CliRunner().invoke(cli, ["model", "build", "Not A Name", "--gguf", str(damaged)])
    assert result.exit_code == 2 and "cannot name a GGUF build" in result.output


def test_attention_probes_sit_on_global_layers_where_others_attend_to_a_window():
    from lemonade_inferos.engine.graph import default_probe_layers

    assert default_probe_layers(30) == (3, 15)
    gemma_local = tuple(layer for layer in range(18) if layer % 6 != 5)
    assert default_probe_layers(18, gemma_local) == (5, 11)
