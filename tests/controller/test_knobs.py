"""Every knob of the policy schema acts on what a request runs with, or is reported not applied with the reason.

The list below must name every leaf of the schema (a test checks it): a new knob needs its own row here.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from lemonade_inferos.controller.controller import Controller
from lemonade_inferos.config.policy import Policy
from lemonade_inferos.engine.session import build_session_options
from lemonade_inferos.hooktypes import InferenceContext


def _plan(controller):
    context = InferenceContext(request_id="r", model="m", model_path="/m", prompt_ids=list(range(64)), max_tokens=4)
    request = controller.plan_request(context)
    return request, request.kv_plan, request.session


KNOBS = {
    "kv.mode": ({"kv": {"mode": "quality_optimized"}}, lambda c, r, p, s: p.name == "quality_optimized"),
    "kv.recent_window": ({"kv": {"recent_window": 128}}, lambda c, r, p, s: p.recent_window == 128),
    "kv.level_thresholds.L1_int8": ({"kv": {"level_thresholds": {"L1_int8": 0.9}}},
                                    lambda c, r, p, s: p.int8_below == 0.9),
    "kv.level_thresholds.L2_int4": ({"kv": {"level_thresholds": {"L2_int4": 0.2}}},
                                    lambda c, r, p, s: p.int4_below == 0.2),
    "kv.level_thresholds.L3_evict": ({"kv": {"level_thresholds": {"L3_evict": 0.1}}},
                                     lambda c, r, p, s: p.evict_below == 0.1),
    "kv.live_format": ({"kv": {"live_format": "model"}}, lambda c, r, p, s: p.live_kv == "model"
                       and s.kv_cache == "model"),
    "kv.segment_reuse": ({"kv": {"segment_reuse": False}}, lambda c, r, p, s: p.segment_recompute is None),
    "kv.segment_recompute": ({"kv": {"segment_recompute": 0.5}}, lambda c, r, p, s: p.segment_recompute == 0.5),
    "io.enable_iobinding": ({"io": {"enable_iobinding": False}}, lambda c, r, p, s: s.enable_iobinding is False),
    "io.dml_pool_bytes": ({"scheduler": {"mode": "gpu_only"}, "io": {"dml_pool_bytes": "3GiB"}},
                          lambda c, r, p, s: s.dml_pool_bytes == 3 * 2**30 and "not in use"
                          in build_session_options(s)[1].not_applied["dml_pool_bytes"]),
    "io.host_pool_bytes": ({"io": {"host_pool_bytes": "2GiB"}},
                           lambda c, r, p, s: s.host_pool_bytes == 2 * 2**30 and "does not bound"
                           in build_session_options(s)[1].not_applied["host_pool_bytes"]),
    "io.arena_shrinkage": ({"io": {"arena_shrinkage": True}},
                           lambda c, r, p, s: r.run_options["memory.enable_memory_arena_shrinkage"] == "cpu:0"),
    "io.run_config": ({"io": {"run_config": {"memory.enable_memory_arena_shrinkage": "cpu:0"}}},
                      lambda c, r, p, s: r.run_options == {"memory.enable_memory_arena_shrinkage": "cpu:0"}),
    "scheduler.mode": ({"scheduler": {"mode": "npu_only"}},
                       lambda c, r, p, s: {o.field for o in r.effective.overrides} >= {"scheduler.prefill_device",
                                                                                        "scheduler.decode_device"}
                       and "VitisAI" in r.effective.overrides[0].reason),
    "scheduler.prefill_device": ({"scheduler": {"prefill_device": "cpu"}},
                                 lambda c, r, p, s: "scheduler.prefill_device" not in
                                 {o.field for o in r.effective.overrides} and s.devices == ["cpu"]),
    "scheduler.decode_device": ({"scheduler": {"decode_device": "cpu"}},
                                lambda c, r, p, s: "scheduler.decode_device" not in
                                {o.field for o in r.effective.overrides}),
    "scheduler.prefill.intra_op_num_threads": ({"scheduler": {"prefill": {"intra_op_num_threads": 1}}},
                                               lambda c, r, p, s: s.intra_op_num_threads == 1 and s.hybrid),
    "scheduler.prefill.allow_spinning": ({"scheduler": {"prefill": {"allow_spinning": False}}},
                                         lambda c, r, p, s: s.allow_spinning is False),
    "scheduler.decode.intra_op_num_threads": ({"scheduler": {"decode": {"intra_op_num_threads": 1}}},
                                              lambda c, r, p, s: s.hybrid and
                                              s.for_phase("decode").intra_op_num_threads == 1),
    "scheduler.decode.allow_spinning": ({"scheduler": {"decode": {"allow_spinning": False}}},
                                        lambda c, r, p, s: s.hybrid and s.for_phase("decode").allow_spinning is False),
    "quality.max_delta_ppl": ({"quality": {"max_delta_ppl": 0.2}}, lambda c, r, p, s: c.guard.limit() == 0.2),
    "quality.min_accept_rate": ({"quality": {"min_accept_rate": 0.8}},
                                lambda c, r, p, s: r.speculation.min_accept_rate == 0.8),
    "speculative.mode": ({"speculative": {"mode": "off"}}, lambda c, r, p, s: not r.speculation.drafts),
    "speculative.num_draft_tokens": ({"speculative": {"num_draft_tokens": 3}},
                                     lambda c, r, p, s: r.speculation.num_draft_tokens == 3),
    "speculative.ngram_min": ({"speculative": {"ngram_min": 3}}, lambda c, r, p, s: r.speculation.ngram_min == 3),
    "speculative.ngram_max": ({"speculative": {"ngram_max": 5}}, lambda c, r, p, s: r.speculation.ngram_max == 5),
    "speculative.draft_model": ({"speculative": {"mode": "draft", "draft_model": "smollm2-135m"}},
                                lambda c, r, p, s: r.speculation.draft_model == "smollm2-135m"),
}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.extend(_leaves(annotation, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_knob_of_the_schema_has_a_row():
    assert sorted(_leaves(Policy)) == sorted(KNOBS)


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_the_knob_acts_on_the_request_plan_or_says_why_not(knob, tmp_path, model_dir):
    update, acts = KNOBS[knob]
    controller = Controller(history_path=tmp_path / "h.jsonl")
    before = _plan(controller)
    controller.update_policy(update)
    request, plan, session = _plan(controller)
    assert acts(controller, request, plan, session), knob
    assert (request, plan, session) != before or knob.startswith(("quality.", "speculative.")), knob
