from __future__ import annotations

import importlib.util
import json
import time

from click.testing import CliRunner

from lemonade_inferos.cli.inferos import cli


def test_model_build_is_idempotent_and_fast_when_built(model_dir):
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["model", "build", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert str(model_dir) in result.output
    assert time.perf_counter() - start < 30


def test_model_list_shows_the_built_model(model_dir):
    result = CliRunner().invoke(cli, ["model", "list", "--json"])
    assert result.exit_code == 0
    assert model_dir.name in [row["name"] for row in json.loads(result.output)]


def test_build_without_the_build_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("INFEROS_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = CliRunner().invoke(cli, ["model", "build", "smollm2-135m", "--weights", "int4"])
    assert result.exit_code == 1
    assert "lemonade-inferos[build]" in result.output and "torch" in result.output


def test_unknown_model_is_a_clear_error():
    result = CliRunner().invoke(cli, ["generate", "no-such-model", "hi"])
    assert result.exit_code == 1
    assert "neither a model folder nor a known model" in result.output


def test_generate_streams_a_reply(model_dir):
    result = CliRunner().invoke(cli, ["generate", str(model_dir), "What is 2+2?", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_model_folder_path_works_where_a_name_does(model_dir):
    result = CliRunner().invoke(cli, ["generate", str(model_dir), "Hi", "--max-tokens", "2", "--engine", "og"])
    assert result.exit_code == 0, result.output
