"""Shared fixtures: the real model, built once per test run into the cache (INFEROS_HOME)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests write under the checkout only, never in the user's home: the built model, history, tokens and spill files
# (INFEROS_HOME), the plugin's user config copy (never a developer's own ~/.config/inferos), what libraries cache
# under the XDG folders (matplotlib, transformers, torch), what third-party clients keep in a home of their own
# (GAIA's ~/.gaia: HOME itself is a folder of the checkout), and pytest's own temporary folders (pytest_configure).
CACHE = Path(__file__).resolve().parents[1] / ".cache"
os.environ.setdefault("INFEROS_HOME", str(CACHE / "inferos"))
os.environ["HOME"] = str(CACHE / "test-home" / "home")
(CACHE / "test-home" / "home").mkdir(parents=True, exist_ok=True)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # what lemonade_inferos sets, for processes that skip it
for _variable, _folder in (("XDG_CACHE_HOME", "xdg-cache"), ("XDG_CONFIG_HOME", "xdg-config"),
                           ("XDG_DATA_HOME", "xdg-data"), ("XDG_STATE_HOME", "xdg-state")):
    os.environ[_variable] = str(CACHE / "test-home" / _folder)
(CACHE / "test-home").mkdir(parents=True, exist_ok=True)
os.environ.setdefault("INFEROS_CONFIG_DIR", tempfile.mkdtemp(prefix="inferos-config-", dir=CACHE / "test-home"))
# every server a test starts gets its own control-API port (7031 may be taken by a user's server)
os.environ.setdefault("INFEROS_RANDOM_PORT", "true")

from lemonade_inferos.bench.servers import running_server  # noqa: E402 (after the environment above)
from lemonade_inferos.engine.build import BuildSpec, build_model  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads the option
def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None:
        config.option.basetemp = str(CACHE / "pytest-tmp")


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
def plugin_server(calibrated_model, tmp_path_factory):
    with running_server("--plugin", "inferos", "--max-queue", "8", "--inferos-prefix-spill-mb", "0",
                        "--inferos-shadow-every", "3",
                        log_path=tmp_path_factory.mktemp("logs") / "plugin-server.log") as base:
        yield base


@pytest.fixture(scope="session")
def baseline_server(model_dir, tmp_path_factory):
    with running_server(log_path=tmp_path_factory.mktemp("logs") / "baseline-server.log") as base:
        yield base


@pytest.fixture(scope="session")
def calibrated_model(model_dir) -> Path:
    """The shared model with its INT8 live KV scales calibrated (what every plugin server's first request needs)."""
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    OrtEngine(model_dir, SessionPolicy(devices=["cpu"], kv_cache="int8"))
    return model_dir


def _isolated_home(calibrated_model: Path, root: Path) -> Path:
    from lemonade_inferos.paths import inferos_home

    home = root / "home"
    shutil.copytree(calibrated_model, home / "models" / calibrated_model.name, copy_function=os.symlink)
    shutil.copytree(inferos_home() / "calibration" / "live-int8", home / "calibration" / "live-int8")
    return home


@pytest.fixture
def isolated_home(calibrated_model, tmp_path) -> Path:
    """An INFEROS_HOME of its own (spill, history, token, pid files, quarantine) whose built model is the shared
    one, file by file through symlinks (deleting the model there removes links, never the shared build), with
    the shared INT8 calibration copied (a server in it does not calibrate again)."""
    return _isolated_home(calibrated_model, tmp_path)


@pytest.fixture(scope="module")
def isolated_home_module(calibrated_model, tmp_path_factory) -> Path:
    """:func:`isolated_home` shared by one test module's server."""
    return _isolated_home(calibrated_model, tmp_path_factory.mktemp("module-home"))


def control_url(base: str) -> str:
    """The control API of a host started with the inferos plugin (its port is random in tests)."""
    import httpx

    return httpx.get(f"{base}/api/v1/health", timeout=10).json()["inferos"]["control_api"]["url"]


# Debian's chromium (the README's test command installs it); the browser tests fail, never skip, without it
CHROMIUM = os.environ.get("INFEROS_CHROMIUM", "/usr/bin/chromium")

TINY_ARCHS = ("llama", "qwen3")


def build_tiny_model(arch: str, tokenizer_dir: Path, root: Path) -> Path:
    """A random-weight model of another architecture (2 layers, hidden 64) with SmolLM2's tokenizer, exported by
    onnxruntime-genai's builder: proves code is not SmolLM2-only. Built once into ``root`` (seconds)."""
    import subprocess
    import sys

    out = root / arch
    if (out / "genai_config.json").is_file():
        return out
    import torch
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2)
    config = {"llama": lambda: transformers.LlamaConfig(**common),
              "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **common)}[arch]()
    torch.manual_seed(0)
    hf = root / f"{arch}-hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, hf / f.name)
    partial = root / f"{arch}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(partial),
                    "-p", "fp32", "-e", "cpu", "-c", str(root / "builder-cache")], check=True,
                   capture_output=True)
    shutil.copy(hf / "chat_template.jinja", partial / "chat_template.jinja")
    os.replace(partial, out)
    return out


@pytest.fixture(scope="session")
def tiny_models(model_dir) -> dict[str, Path]:
    from lemonade_inferos.paths import inferos_home

    return {arch: build_tiny_model(arch, inferos_home() / "hf" / "smollm2-135m", inferos_home() / "test-models")
            for arch in TINY_ARCHS}


class RedisServer:
    """A real ``redis-server`` (Debian's; Valkey speaks the same protocol) on a free loopback port, no
    persistence, LRU eviction as the shared prefix store expects. ``stop``/``start`` for outage tests."""

    def __init__(self, root: Path, maxmemory: str = "256mb") -> None:
        from lemonade_inferos.bench.servers import free_port

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: the README's test command installs it (apt-get)"
        self.binary, self.root, self.maxmemory = binary, root, maxmemory
        self.port = free_port()
        self.url = f"valkey://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path):
    """A redis-server of the test's own (to kill and restart)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()
