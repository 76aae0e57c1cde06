"""Constrained decoding: the output follows its grammar on both engines, with speculation, and a draft the grammar
forbids is rejected."""

from __future__ import annotations

import json

import jsonschema_rs
import numpy as np
import pytest

from lemonade_inferos.engine.guidance import Guidance, TokenConstraint, guidance_tokenizer
from lemonade_inferos.engine.picker import TokenPicker
from lemonade_inferos.engine.sampling import Sampler, SamplingParams
from lemonade_inferos.engine.speculative import SpeculationConfig
from lemonade_inferos.errors import GenerationError
from lemonade_inferos.host.structured import compact

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
          "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["big", "small", "old"]}, "maxItems": 3}}}


def _prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def _text(engine, prompt, params, **kwargs) -> str:
    return "".join(chunk.text for chunk in engine.generate(prompt, params, **kwargs))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_our_engine_follows_a_json_schema_greedy_sampled_and_speculating(ort_engine, temperature):
    guidance = Guidance.json_schema(compact(SCHEMA))
    prompt = _prompt(ort_engine, "Describe a city as JSON with its name, population and tags.")
    for speculation in (None, SpeculationConfig(mode="ngram")):
        params = SamplingParams(max_tokens=120, temperature=temperature, seed=7, guidance=guidance)
        reply = _text(ort_engine, prompt, params, speculation=speculation)
        jsonschema_rs.validate(SCHEMA, json.loads(reply))


def test_og_generator_takes_the_same_guidance(og_engine):
    guidance = Guidance.json_schema(compact(SCHEMA))
    reply = _text(og_engine, _prompt(og_engine, "A city as JSON."), SamplingParams(max_tokens=120, guidance=guidance))
    jsonschema_rs.validate(SCHEMA, json.loads(reply))


def test_a_completed_grammar_ends_the_generation_with_stop(ort_engine):
    guidance = Guidance("regex", "(yes|no)")
    chunks = list(ort_engine.generate(_prompt(ort_engine, "Is the sky blue?"),
                                      SamplingParams(max_tokens=50, guidance=guidance)))
    assert "".join(c.text for c in chunks) in ("yes", "no") and chunks[-1].finish_reason == "stop"


def test_a_draft_the_grammar_forbids_is_rejected_for_an_allowed_token(ort_engine):
    tokenizer = guidance_tokenizer(ort_engine.tokenizer.tokenizer, ort_engine.folder.eos_token_ids)
    vocab = ort_engine.folder.vocab_size
    constraint = TokenConstraint(Guidance.json_schema(compact(SCHEMA)), tokenizer, vocab)
    forbidden = ort_engine.tokenizer.encode("Hello")[0]
    allowed = constraint.allowed()
    assert not allowed[forbidden]
    rows = np.zeros((2, vocab), dtype=np.float32)
    rows[:, forbidden] = 10.0          # the model "wants" the draft
    picker = TokenPicker(Sampler(SamplingParams(), vocab), constraint)
    outs = picker.accepted(rows, [forbidden])
    assert outs[0] != forbidden and allowed[outs[0]] and len(outs) == 1


def test_a_schema_llguidance_cannot_compile_is_refused():
    with pytest.raises(GenerationError, match="cannot be used"):
        Guidance.json_schema({"type": "nonsense"}).validate()
    with pytest.raises(GenerationError, match="cannot be used"):
        Guidance("lark_grammar", "start: missing_rule").validate()
