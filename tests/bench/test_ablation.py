"""The ablation's configurations and the document's synergy analysis."""

from __future__ import annotations

import pytest

from lemonade_inferos.bench.ablation import CONFIGURATIONS, active_features, interpret, policy_update, synergy
from lemonade_inferos.config.policy import Policy


def _tps(value: float) -> dict:
    return {"throughput": {"tokens_per_second": value}}


def test_every_configuration_is_a_valid_policy_that_turns_on_exactly_its_features():
    for name, features in CONFIGURATIONS.items():
        policy = Policy().merged(policy_update(features))
        assert (policy.kv.mode == "dynamic") == ("kv" in features), name
        assert (policy.kv.live_format == "int8") == ("kv" in features), name
        assert policy.io.enable_iobinding == ("io" in features), name
        assert (policy.scheduler.mode == "hybrid") == ("hybrid" in features), name
        assert (policy.speculative.mode == "auto") == ("spec" in features), name


def test_synergy_is_the_combined_effect_minus_the_sum_of_the_individual_ones():
    results = {"baseline": _tps(10), "kv_only": _tps(12), "io_only": _tps(11), "hybrid_only": _tps(10),
               "kv_io": _tps(14), "full": _tps(12.5), "spec_only": _tps(13), "full_spec": _tps(13)}
    analysis = synergy(results)
    assert analysis["individual_effects"] == pytest.approx({"kv_only": 20, "io_only": 10, "hybrid_only": 0,
                                                            "spec_only": 30})
    kv_io = analysis["synergy_analysis"]["kv_io"]
    assert (kv_io["expected"], kv_io["actual"], kv_io["synergy"]) == pytest.approx((30, 40, 10))
    assert kv_io["interpretation"] == "strong positive synergy"
    assert analysis["synergy_analysis"]["full"]["synergy"] == pytest.approx(-5)
    assert analysis["synergy_analysis"]["full"]["interpretation"] == "negative interaction"
    assert analysis["synergy_analysis"]["full_spec"]["expected"] == pytest.approx(60)


@pytest.mark.parametrize("points, band", [(5.1, "strong positive synergy"), (0.1, "weak positive synergy"),
                                          (0.0, "no synergy"), (-4.9, "no synergy"), (-5.0, "negative interaction")])
def test_the_interpretation_uses_the_documents_bands(points, band):
    assert interpret(points) == band


def test_what_ran_is_read_from_the_controllers_status():
    metrics = {"optimization_status": {"kv_quantization_active": False, "io_binding_active": True,
                                       "hybrid_scheduling_active": False,
                                       "hybrid_scheduling_reason": "one device", "live_form": "float32"},
               "totals": {"drafted_tokens": 0}, "quality": {"accept_rate": {"current": None}}}
    active = active_features(metrics)
    assert (active["kv"], active["io"], active["hybrid"], active["spec"]) == (False, True, False, False)
    assert active["hybrid_reason"] == "one device"
