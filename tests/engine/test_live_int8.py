"""The INT8 live form: any GroupQueryAttention folder patched and calibrated at load, its quality, its scales."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import onnx
import pytest

from lemonade_inferos.engine import kv_scales
from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from lemonade_inferos.eval.ppl import eval_ppl

INT8 = SessionPolicy(devices=["cpu"], kv_cache="int8")


@pytest.fixture(scope="module")
def int8_engine(model_dir):
    return OrtEngine(model_dir, INT8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_any_gqa_folder_runs_int8_live_close_to_its_float_form(tiny_models, arch):
    engine = OrtEngine(tiny_models[arch], INT8)
    report = engine.live_kv_report()
    assert engine.layout.live_int8 and engine.layout.dtype == np.int8
    assert report["live_kv"] == "int8" and report["scales"]["source"].startswith("calibrated")
    [row] = eval_ppl(engine, ["live8:fp"], context=256)
    assert row["kld"] < 1e-3       # random weights: near-uniform distributions, measured 6e-8 / 2e-7
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3, 4, 5], params)) == 8


def test_int8_live_agrees_with_fp32_live_under_teacher_forcing(model_dir):
    engine = OrtEngine(model_dir, SessionPolicy(devices=["cpu"]))
    [row] = eval_ppl(engine, ["live8:fp"], context=2048)
    # measured 0.980 at 2048 tokens (0.977 on the probe graph): every held token is INT8 here, sinks and window too
    assert row["top1"] >= 0.975
    assert row["kld"] <= 0.005      # measured 0.0016
    assert abs(row["delta_ppl"]) <= 0.02   # measured +0.009 (plain graph; +0.023 on the probe graph)
    assert row["compression_vs_fp16"] == pytest.approx(0.5, abs=0.01)


def test_calibration_is_kept_and_reused_on_the_second_load(int8_engine, model_dir):
    fingerprint = int8_engine.folder.fingerprint
    path = kv_scales.calibration_path(fingerprint)
    assert path.is_file() and json.loads(path.read_text())["fingerprint"] == fingerprint
    again = OrtEngine(model_dir, INT8)
    assert again.live_kv_report()["scales"]["source"] == "calibrated (reused)"
    assert again.layout.scales == int8_engine.layout.scales
    assert again.live_kv_report()["loaded_forms"] == ["int8"]  # the float form was not loaded to reuse them


def test_a_damaged_calibration_file_is_calibrated_again(tiny_models, tmp_path):
    engine = OrtEngine(tiny_models["llama"], INT8)
    fingerprint = engine.folder.fingerprint
    path = kv_scales.calibration_path(fingerprint)
    path.write_bytes(b"\xff\xfe not json")
    again = OrtEngine(tiny_models["llama"], INT8)
    assert again.live_kv_report()["scales"]["source"] == "calibrated"
    assert json.loads(path.read_text())["fingerprint"] == fingerprint


def test_a_server_meeting_an_uncalibrated_folder_serves_at_once_and_switches_to_int8_when_ready(tiny_models):
    kv_scales.calibration_path(load_model_folder(tiny_models["llama"]).fingerprint).unlink(missing_ok=True)
    engine = OrtEngine(tiny_models["llama"], INT8, background_calibration=True)
    report = engine.live_kv_report()
    # no stall: the model's own form serves while a child process calibrates (it takes seconds to start)
    assert not engine.layout.live_int8 and report["live_kv"] == "float32"
    assert report["calibrating"]["passages"] == kv_scales.CALIBRATION_PASSAGES
    assert "calibrated in the background" in report["int8_unavailable_reason"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3, 4], params)) == 4
    deadline = time.monotonic() + 300
    while engine.live_kv_report()["calibrating"] is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    report = engine.live_kv_report()
    assert engine.layout.live_int8 and report["live_kv"] == "int8" and report["int8_unavailable_reason"] is None
    assert report["scales"]["source"] == "calibrated"
    assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3, 4], params)) == 4


def test_pulling_a_folder_calibrates_it_with_progress(tiny_models, tmp_path):
    from lemonade_inferos.host.registry import ModelRegistry

    kv_scales.calibration_path(load_model_folder(tiny_models["qwen3"]).fingerprint).unlink(missing_ok=True)
    said: list[str] = []
    ModelRegistry(tmp_path / "user_models.json").pull("user.tiny", str(tiny_models["qwen3"]), progress=said.append)
    total = kv_scales.CALIBRATION_PASSAGES
    assert f"calibrating INT8 live KV scales: passage {total}/{total}" in said
    assert said[-1].startswith("INT8 live KV scales calibrated in ")
    assert OrtEngine(tiny_models["qwen3"], INT8).live_kv_report()["scales"]["source"] == "calibrated (reused)"
    said.clear()
    ModelRegistry(tmp_path / "user_models.json").pull("user.tiny", str(tiny_models["qwen3"]), progress=said.append)
    assert said == ["INT8 live KV scales: already calibrated"]


def test_the_folders_own_scale_file_is_used(tiny_models, tmp_path):
    folder = tmp_path / "with-scales"
    shutil.copytree(tiny_models["llama"], folder)
    base = OrtEngine(tiny_models["llama"], INT8).layout.scales
    layers = base.keys.shape[0]
    (folder / kv_scales.FOLDER_SCALE_FILE).write_text(json.dumps({"scales": {
        "k_scales": (base.keys * 2).reshape(layers, -1).tolist(),
        "v_scales": (base.values * 2).reshape(layers, -1).tolist()}}))
    engine = OrtEngine(folder, INT8)
    assert engine.live_kv_report()["scales"]["source"] == f"folder scale file {kv_scales.FOLDER_SCALE_FILE}"
    np.testing.assert_allclose(engine.layout.scales.keys, base.keys * 2, rtol=1e-6)


def test_a_graph_that_cannot_be_patched_serves_as_before_and_says_why(tiny_models, tmp_path):
    folder = tmp_path / "unpatchable"
    shutil.copytree(tiny_models["llama"], folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    past = "past_key_values.0.key"  # a second reader of the past: the kernel could not own its dtype
    model.graph.node.append(onnx.helper.make_node("Identity", [past], ["past_copy"], name="/extra/Identity"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("past_copy", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(folder / "model.onnx"))
    engine = OrtEngine(folder, INT8)
    report = engine.live_kv_report()
    assert not engine.layout.live_int8 and engine.layout.dtype == np.float32
    assert "/extra/Identity" in report["int8_unavailable_reason"] and report["live_kv"] == "float32"
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3, 4], params)) == 6


def test_the_kernel_writes_the_codes_our_quantizer_computes(int8_engine, corpus_ids):
    """Layer 0 sees the same input in both forms, so its K/V codes must be ours of the float K/V."""
    ids = corpus_ids[:96]
    live, full = int8_engine.new_cache(), int8_engine.new_cache(int8_engine.full_precision_layout)
    int8_engine.forward(ids, live)
    int8_engine.forward(ids, full)
    scales = int8_engine.layout.scales
    for slot in (0, 1):
        ours = scales.quantize(full.layer(0)[slot], 0, slot)
        kernel = live.layer(0)[slot]
        assert np.abs(ours.astype(np.int16) - kernel).max() <= 1
        assert (ours == kernel).mean() > 0.999


def test_values_beyond_the_calibrated_range_saturate():
    scales = kv_scales.scales_from_lists([[0.01] * 4], [[0.02] * 4], heads=1, head_size=4, source="test")
    x = np.array([[[0.5, -0.5, 0.05, -1.28]]], dtype=np.float32)     # [H=1, T=1, D=4]
    codes = scales.quantize(x, 0, 0)
    np.testing.assert_array_equal(codes, [[[50 * 1, -50, 5, -128]]])
    clipped = scales.quantize(x * 10, 0, 0)
    np.testing.assert_array_equal(clipped, [[[127, -128, 50, -128]]])
    np.testing.assert_allclose(scales.dequantize(clipped, 0, 0), [[[1.27, -1.28, 0.5, -1.28]]], rtol=1e-6)


def test_bad_scales_are_refused():
    with pytest.raises(ValueError, match="finite and positive"):
        kv_scales.scales_from_lists([[0.0, 1.0]], [[1.0, 1.0]], heads=1, head_size=2, source="test")
    with pytest.raises(ValueError, match="shapes"):
        kv_scales.scales_from_lists([[1.0]], [[1.0, 1.0]], heads=1, head_size=2, source="test")


def test_calibration_is_not_bound_by_a_small_context(tiny_models, tmp_path):
    folder = tmp_path / "small-context"
    shutil.copytree(tiny_models["qwen3"], folder, copy_function=os.symlink)
    kv_scales.calibration_path(load_model_folder(folder).fingerprint).unlink(missing_ok=True)
    engine = OrtEngine(folder, INT8, context_length=96)
    assert engine.layout.live_int8 and engine.layout.max_tokens == 96
    assert engine.live_kv_report()["scales"]["source"] == "calibrated"


def test_an_unusable_scale_file_leaves_the_float_form_serving_and_says_why(tiny_models, tmp_path):
    folder = tmp_path / "bad-scales"
    shutil.copytree(tiny_models["llama"], folder, copy_function=os.symlink)
    (folder / kv_scales.FOLDER_SCALE_FILE).write_text('{"scales": {"k_scales": [[0.0]]}}')
    engine = OrtEngine(folder, INT8)
    assert not engine.layout.live_int8
    assert kv_scales.FOLDER_SCALE_FILE in engine.live_kv_report()["int8_unavailable_reason"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3], params)) == 4
