"""Structured output through the Engine (SamplingParams.guide): every constrained answer of
the bundled text model parses and validates against its schema (the jsonschema library is
the oracle), matches its regex or is one of its choices; unconstrained requests beside them
keep generate's exact tokens; and the constraint really is what makes the output valid.

The SmolLM2 run (50 schema-constrained requests, tokens/s constrained vs unconstrained) is
benchmarks/structured_output.py; its figures are in BUILD_NOTES.md.
"""
import json
import re

import numpy as np
import pytest

import kvjax
from conftest import require_module

jsonschema = require_module("jsonschema", "the oracle of structured output")
require_module("llguidance", "the grammar engine of structured output")
from kvjax.structured import compile_format, spec_from_request, tokenizer_info  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "kind": {"enum": ["cat", "dog", "owl"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}}}}
POINTS = {"type": "array", "minItems": 1, "maxItems": 3,
          "items": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                    "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "boolean"}}}}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{3}"
CHOICES = ["list", "dict", "tuple"]


@pytest.fixture(scope="module")
def bundled():
    cfg, params, tok = kvjax.load_model("text")
    with kvjax.Engine(cfg, params, max_slots=4, max_len=512, page_size=16, decode_steps=4, prefill_chunk=32) as eng:
        yield cfg, params, tok, eng


def grammar(tok, cfg, body):
    return compile_format(spec_from_request(body), tokenizer_info(tok, cfg.vocab_size))


def compact(schema):
    return {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}


def text_of(tok, completion):
    return tok.decode([t for t in completion.tokens if t not in tok.eos_ids])


def test_constrained_answers_validate_and_free_ones_stay_exact(bundled):
    cfg, params, tok, eng = bundled
    prompts = [tok.encode(p) for p in ("The list type", "A dictionary maps", "Write a record:", "def f(x):")]
    cases = [(compact(PERSON), PERSON), (compact(POINTS), POINTS),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, PERSON)]
    sps, checks = [], []
    for i, (body, schema) in enumerate(cases * 2):
        # (whitespace is free in response_format's JSON: up to 20 characters per gap)
        sps.append(kvjax.SamplingParams(max_tokens=120 if "structured_outputs" in body else 450, stop_token_ids=tuple(tok.eos_ids), temperature=0.8 * (i % 2),
                                        seed=i, guide=grammar(tok, cfg, body)))
        checks.append(schema)
    free = kvjax.SamplingParams(max_tokens=24)
    done = eng.generate([prompts[i % 4] for i in range(len(sps))] + prompts[:2], sps + [free, free])
    for c, schema in zip(done, checks):
        assert c.finish_reason == "stop", (c.finish_reason, text_of(tok, c))
        jsonschema.validate(json.loads(text_of(tok, c)), schema)
    for c, p in zip(done[len(sps):], prompts[:2]):
        ref = kvjax.generate(cfg, params, np.array([p]), max_new_tokens=24)
        assert c.tokens == np.asarray(ref.tokens)[0].tolist()


def test_regex_and_choice(bundled):
    cfg, _, tok, eng = bundled
    sps = [kvjax.SamplingParams(max_tokens=40, stop_token_ids=tuple(tok.eos_ids), temperature=t, seed=s, guide=g)
           for g in (grammar(tok, cfg, {"guided_regex": REGEX}), grammar(tok, cfg, {"guided_choice": CHOICES}))
           for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    done = eng.generate([tok.encode("Name: ")] * len(sps), sps)
    for c in done[:3]:
        assert re.fullmatch(REGEX, text_of(tok, c)), text_of(tok, c)
    for c in done[3:]:
        assert text_of(tok, c) in CHOICES


def test_without_the_guide_the_model_writes_no_json(bundled):
    """The oracle can fail: the same prompts unconstrained are not valid records."""
    cfg, _, tok, eng = bundled
    done = eng.generate([tok.encode("Write a record:")], kvjax.SamplingParams(max_tokens=60))
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(text_of(tok, done[0])), PERSON)


def test_a_guide_for_another_vocabulary_is_refused(bundled):
    cfg, _, tok, eng = bundled
    other = compile_format(spec_from_request({"guided_regex": REGEX}), tokenizer_info(tok, cfg.vocab_size + 5))
    with pytest.raises(ValueError, match="guide"):
        eng.submit([1, 2, 3], kvjax.SamplingParams(max_tokens=4, guide=other))
