"""The plugin's settings: one model, its layers in order, and bad values refused with their source named."""

from __future__ import annotations

import pytest

from lemonade_inferos.config.files import ConfigError
from lemonade_inferos.config.settings import InferosSettings, SettingsSources


def _sources(tmp_path, options=None, environ=None, shipped=None, user=None, config=None):
    shipped_path, user_path = tmp_path / "shipped.toml", tmp_path / "user.toml"
    if shipped is not None:
        shipped_path.write_text(shipped)
    if user is not None:
        user_path.write_text(user)
    options = dict(options or {})
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        options["config"] = str(tmp_path / "c.yaml")
    return SettingsSources(options=options, environ=environ or {}, shipped_path=shipped_path, user_path=user_path)


def test_defaults_live_in_the_model_alone():
    settings = InferosSettings()
    assert settings.prefix_cache_mb == 256 and settings.policy.kv.mode == "dynamic" and settings.loops.fast_ms == 1


def test_layers_apply_in_order_file_user_config_env_options(tmp_path):
    sources = _sources(
        tmp_path,
        shipped='[plugin]\nname = "inferos"\n[plugin.config]\nprefix_cache_mb = 10\nwarm_caches = 2\nkv_mode = "latency_optimized"\n',
        user="[plugin.config]\nprefix_cache_mb = 20\n[plugin.config.kv]\nrecent_window = 96\n",
        config="infer_os:\n  kv:\n    recent_window: 128\n  loops: {mid_ms: 50}\n",
        environ={"INFEROS_KV__RECENT_WINDOW": "160", "INFEROS_HOME": "/not/a/setting", "INFEROS_WARM_CACHES": "3"},
        options={"kv.recent_window": "192", "shadow-every": "0"})
    settings = sources.load()
    assert settings.prefix_cache_mb == 20                                  # the user's copy over the shipped file
    assert settings.policy.kv.mode == "latency_optimized"                  # shipped file, short form
    assert settings.loops.mid_ms == 50                                     # --config
    assert settings.warm_caches == 3                                       # environment over the files
    assert settings.policy.kv.recent_window == 192 and settings.shadow_every == 0   # options last
    assert [layer.source for layer in sources.layers()][-2:] == ["environment (INFEROS_*)",
                                                                  "plugin options (--plugin-option, --inferos-*)"]


@pytest.mark.parametrize("where,kwargs,named", [
    ("user file", {"user": "[plugin.config]\nwarm_caches = 1\nrecent_window = 3\n"}, "user.toml:3"),
    ("config file", {"config": "infer_os:\n  kv:\n    mode: fastest\n"}, "c.yaml:3"),
    ("environment", {"environ": {"INFEROS_SHADOW_EVERY": "often"}}, "environment variable INFEROS_SHADOW_EVERY"),
    ("option", {"options": {"kv.level_thresholds.L1_int8": "7"}}, "plugin option kv.level_thresholds.L1_int8"),
    ("unknown key", {"options": {"prefix_cache_gb": "1"}}, "prefix_cache_gb"),
])
def test_a_bad_value_anywhere_names_its_layer_line_and_field(tmp_path, where, kwargs, named):
    with pytest.raises(ConfigError) as info:
        _sources(tmp_path, **kwargs).load()
    assert named in str(info.value), str(info.value)


def test_a_toml_syntax_error_in_the_plugin_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="user.toml"):
        _sources(tmp_path, user="[plugin.config\nx = 1\n").load()


def test_restart_only_fields_are_told_apart_from_live_ones():
    old = InferosSettings()
    new = old.model_copy(update={"prefix_cache_mb": 1.0, "control_port": 9999})
    assert new.restart_fields(old) == ["control_port"]
