"""Every way a step can run gives the same tokens: IOBinding or a plain session.run, one session or a session per
phase (the hybrid scheduler); and the run options reach ONNX Runtime."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import PhaseOverrides, SessionPolicy, build_session_options

PROMPT = list(range(200, 460))


def _tokens(engine: OrtEngine, run_options=None) -> list[int]:
    chunks = engine.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0.0), run_options=run_options)
    return [t for chunk in chunks for t in (chunk.token_ids or [])]


@pytest.fixture(scope="module")
def reference(calibrated_model) -> list[int]:
    return _tokens(OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8")))


@pytest.mark.parametrize("policy", [
    SessionPolicy(devices=["cpu"], kv_cache="int8", enable_iobinding=False),
    SessionPolicy(devices=["cpu"], kv_cache="int8", allow_spinning=True,
                  decode=PhaseOverrides(intra_op_num_threads=1, allow_spinning=False)),
    SessionPolicy(devices=["cpu"], kv_cache="int8", enable_iobinding=False,
                  decode=PhaseOverrides(intra_op_num_threads=1)),
], ids=["plain-run", "hybrid", "hybrid-plain-run"])
def test_every_step_path_gives_the_tokens_of_iobinding_on_one_session(calibrated_model, reference, policy):
    engine = OrtEngine(calibrated_model, policy)
    assert _tokens(engine) == reference
    report = engine.session_report()
    assert report["io_binding"] == policy.enable_iobinding and report["hybrid"] == policy.hybrid
    if policy.hybrid:   # two sessions over one KV buffer: one per phase, with their own options
        assert engine.live_kv_report()["loaded_sessions"] == ["int8:decode", "int8:prefill"]
        assert report["decode"]["applied"]["intra_op_num_threads"] == 1
        assert report["decode"]["applied"]["allow_spinning"] is policy.for_phase("decode").allow_spinning


def test_decode_options_equal_to_prefill_keep_one_session():
    policy = SessionPolicy(devices=["cpu"], decode=PhaseOverrides(devices=["cpu"], allow_spinning=True))
    assert not policy.hybrid and policy.for_phase("decode") == policy.for_phase("prefill")


def test_phases_whose_devices_both_fall_back_to_the_cpu_share_one_session(calibrated_model):
    """The default scheduler asks DirectML for prefill and the NPU for decode; where neither exists both run on
    the CPU with the same options: one session, one copy of the weights (two were ~700 MiB more for fp32)."""
    policy = SessionPolicy(devices=["dml", "cpu"], kv_cache="int8", decode=PhaseOverrides(devices=["npu", "cpu"]))
    assert not policy.hybrid
    engine = OrtEngine(calibrated_model, policy)
    _tokens(engine)
    assert engine.live_kv_report()["loaded_sessions"] == ["int8:prefill"]
    assert SessionPolicy(devices=["dml", "cpu"], decode=PhaseOverrides(devices=["npu", "cpu"],
                                                                        intra_op_num_threads=1)).hybrid


def test_run_options_reach_onnx_runtime(calibrated_model, reference):
    engine = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"))
    assert _tokens(engine, {"memory.enable_memory_arena_shrinkage": "cpu:0"}) == reference
    with pytest.raises(Exception, match="arena"):   # ONNX Runtime read the entry: no arena on that device
        _tokens(engine, {"memory.enable_memory_arena_shrinkage": "cpu:7"})


def test_a_terminated_run_options_ends_the_step_in_flight(calibrated_model):
    engine = OrtEngine(calibrated_model, SessionPolicy(devices=["cpu"], kv_cache="int8"))
    options = ort.RunOptions()
    options.terminate = True
    with pytest.raises(Exception, match="[Tt]erminat|[Ee]xiting"):
        _tokens(engine, options)


def test_host_pool_bytes_is_reported_not_applied_because_the_arena_cap_does_not_bound_this_model(model_dir,
                                                                                               tmp_path):
    """Pins the measurement behind the report: a 1 MiB shared CPU arena does not stop a 100 MB logits output of
    the model (while it does stop a plain graph). If ONNX Runtime changes this, this test fails: the knob can act."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({{"max_mem": 2**20, "arena_extend_strategy": 1}}))
        options = ort.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")
        session = ort.InferenceSession({str(model_dir / "model.onnx")!r}, options, providers=["CPUExecutionProvider"])
        feeds = {{"input_ids": np.ones((1, 512), np.int64), "attention_mask": np.ones((1, 512), np.int64)}}
        for i in session.get_inputs():
            if i.name.startswith("past"):
                feeds[i.name] = np.zeros((1, {3}, 0, 64), np.float32)
        print(session.run(["logits"], feeds)[0].nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) > 50 * 2**20, out.stderr[-2000:]
    _, report = build_session_options(SessionPolicy(devices=["cpu"], host_pool_bytes=2**30, dml_pool_bytes=2**31))
    assert "does not bound" in report.not_applied["host_pool_bytes"]
    assert "not in use" in report.not_applied["dml_pool_bytes"]
    assert "host_pool_bytes" not in report.applied
