from __future__ import annotations

import logging

from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.session import SessionPolicy, build_session_options


def test_missing_provider_falls_back_to_cpu_and_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        _, report = build_session_options(SessionPolicy(devices=["dml", "npu", "cpu"]))
    assert report.providers[-1] == "CPUExecutionProvider"
    assert "DmlExecutionProvider" in report.missing_providers
    assert "VitisAIExecutionProvider" in report.missing_providers


def test_options_not_honoured_by_the_provider_are_reported():
    _, report = build_session_options(SessionPolicy(devices=["cpu"], dml_pool_bytes=2**31))
    assert "dml_pool_bytes" in report.not_applied


def test_engine_loads_on_cpu_when_only_dml_is_requested(model_dir):
    engine = OrtEngine(model_dir, SessionPolicy(devices=["dml"], intra_op_num_threads=1))
    assert engine.session.get_providers() == ["CPUExecutionProvider"]
    assert engine.report.applied["intra_op_num_threads"] == 1
