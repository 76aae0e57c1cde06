"""Shared fixtures: the real model, built once per test run into the cache (INFEROS_HOME)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# every server a test starts gets its own control-API port (7031 may be taken by a user's server)
os.environ.setdefault("INFEROS_RANDOM_PORT", "true")

from lemonade_inferos.bench.servers import running_server
from lemonade_inferos.engine.build import BuildSpec, build_model


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """SmolLM2-135M-Instruct with fp32 weights, built offline from the packaged GGUF (cached)."""
    return build_model(BuildSpec("smollm2-135m", "fp32", "fp32"))


@pytest.fixture(scope="session")
def ort_engine(model_dir: Path):
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    return OrtEngine(model_dir, SessionPolicy(devices=["cpu"]))


@pytest.fixture(scope="session")
def og_engine(model_dir: Path):
    from lemonade_inferos.engine.og_engine import OgEngine

    return OgEngine(model_dir)


@pytest.fixture(scope="session")
def corpus_ids(ort_engine) -> list[int]:
    from lemonade_inferos.corpus import corpus_text

    return ort_engine.tokenizer.encode(corpus_text()[:200_000])


@pytest.fixture(scope="session")
def plugin_server(model_dir, tmp_path_factory):
    with running_server("--plugin", "inferos", "--max-queue", "8", "--inferos-prefix-spill-mb", "0",
                        "--inferos-shadow-every", "3",
                        log_path=tmp_path_factory.mktemp("logs") / "plugin-server.log") as base:
        yield base


@pytest.fixture(scope="session")
def baseline_server(model_dir, tmp_path_factory):
    with running_server(log_path=tmp_path_factory.mktemp("logs") / "baseline-server.log") as base:
        yield base


@pytest.fixture
def isolated_home(model_dir, tmp_path) -> Path:
    """An INFEROS_HOME of its own (spill, history, token, pid files, quarantine) whose built model is the shared
    one, file by file through symlinks (deleting the model there removes links, never the shared build)."""
    home = tmp_path / "home"
    shutil.copytree(model_dir, home / "models" / model_dir.name, copy_function=os.symlink)
    return home


def control_url(base: str) -> str:
    """The control API of a host started with the inferos plugin (its port is random in tests)."""
    import httpx

    return httpx.get(f"{base}/api/v1/health", timeout=10).json()["inferos"]["control_api"]["url"]
