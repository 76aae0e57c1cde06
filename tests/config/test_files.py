from __future__ import annotations

import time

import pytest

from lemonade_inferos.config.files import PRESETS_DIR, ConfigError, load_config, parse_config
from lemonade_inferos.controller.controller import Controller


def test_every_shipped_preset_is_valid():
    names = {p.name for p in PRESETS_DIR.iterdir()}
    assert {"default.yaml", "model-3b-or-less.yaml", "model-7b-8b.yaml", "model-13b-20b.yaml",
            "chatbot-latency.yaml", "batch-throughput.yaml", "high-quality.toml"} <= names
    for path in PRESETS_DIR.iterdir():
        load_config(path)
    assert load_config(PRESETS_DIR / "model-13b-20b.yaml").policy.kv.recent_window == 32
    assert load_config(PRESETS_DIR / "high-quality.toml").policy.kv.mode == "quality_optimized"


def test_design_document_yaml_with_loops_and_sizes_loads():
    config = load_config(PRESETS_DIR / "default.yaml")
    assert config.policy.io.dml_pool_bytes == 2048 * 2**20 and config.loops.slow_ms == 100


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as info:
        parse_config("infer_os:\n  kv:\n    recent_window: [64\n", "c.yaml")
    assert info.value.line is not None and "c.yaml" in str(info.value)


def test_invalid_field_is_named_with_its_path_and_line():
    with pytest.raises(ConfigError) as info:
        parse_config("infer_os:\n  kv:\n    recent_window: 4\n", "c.yaml")
    assert info.value.field == "infer_os.kv.recent_window" and info.value.line == 3


def test_bad_loop_period_is_named():
    with pytest.raises(ConfigError, match="infer_os.loops.fast_ms"):
        parse_config("infer_os:\n  loops:\n    fast_ms: 0\n", "c.yaml")


def test_missing_root_is_explained():
    with pytest.raises(ConfigError, match="infer_os"):
        parse_config("kv:\n  recent_window: 64\n", "c.yaml")


def test_toml_twin_parses_the_same_policy():
    toml = "[infer_os.kv]\nrecent_window = 96\nmode = \"latency_optimized\"\n"
    yaml_text = "infer_os:\n  kv:\n    recent_window: 96\n    mode: latency_optimized\n"
    assert parse_config(toml, "c.toml").policy == parse_config(yaml_text, "c.yaml").policy


def test_hot_reload_applies_a_good_edit_and_rejects_a_bad_one_keeping_the_old(tmp_path):
    path = tmp_path / "inferos.yaml"
    path.write_text("infer_os:\n  kv:\n    recent_window: 64\n")
    controller = Controller(config_path=path, history_path=tmp_path / "history.jsonl")
    time.sleep(0.01)
    path.write_text("infer_os:\n  kv:\n    recent_window: 128\n")
    controller.check_config_files()
    assert controller.policy.kv.recent_window == 64    # seen once: read when it still holds at the next round
    controller.check_config_files()
    assert controller.policy.kv.recent_window == 128
    time.sleep(0.01)
    path.write_text("infer_os:\n  kv:\n    recent_window: 9000\n")
    controller.check_config_files()
    controller.check_config_files()
    assert controller.policy.kv.recent_window == 128
    assert controller.config_error["field"] == "kv.recent_window" and controller.config_error["line"] == 3
    kinds = [e["kind"] for e in controller.history.entries()]
    assert "config" in kinds and "config_rejected" in kinds


def test_the_slow_loop_survives_any_bytes_and_applies_the_next_good_edit(tmp_path):
    path = tmp_path / "inferos.yaml"
    path.write_text("infer_os:\n  kv:\n    recent_window: 64\n  loops: {slow_ms: 20}\n")
    controller = Controller(config_path=path, history_path=tmp_path / "history.jsonl")
    controller.start()
    try:
        for bad, line in ((b"infer_os:\n  kv:\n    mode: x\x07\n", 3), (b"infer_os:\n  kv: {mode: \xff\xfe}\n", 2)):
            controller.config_error = None
            path.write_bytes(bad)
            _wait(lambda: controller.config_error is not None)
            assert controller.config_error["line"] == line and controller.policy.kv.recent_window == 64
        path.write_text("infer_os:\n  kv:\n    recent_window: 96\n  loops: {slow_ms: 20}\n")
        _wait(lambda: controller.policy.kv.recent_window == 96)
        assert controller.loops.status()["slow"]["errors"] == 0
    finally:
        controller.stop()


def _wait(condition, timeout_s: float = 5.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "the watcher did not react"
        time.sleep(0.02)
