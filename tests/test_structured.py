"""kvjax.structured: request fields -> grammar specs, and the per-step token masks they give.

Oracles: the `jsonschema` package (every random walk through a JSON Schema's masks decodes to
JSON that validates against the schema), Python's `re` (a regex spec's walks fullmatch the
regex) and plain equality (a choice spec's walks are one of the choices). A random walk
starts from a fresh matcher and repeatedly takes a random allowed token (seeded) until it
takes EOS (allowed only where the grammar can end: checked at every step) or 300 tokens.
Tokenizers: the byte-level ByteTokenizer and SmolLM2's real 49,152-token BPE (the tokenizer
only, read from the packaged GGUF's metadata; no model forward).
"""
import json
import re

import numpy as np
import pytest

from conftest import require_module

llguidance = require_module("llguidance", "the structured-output grammar engine (pip install 'kvjax[structured]')")
jsonschema = require_module("jsonschema", "the oracle for JSON Schema walks")

from kvjax.structured import (FormatError, GrammarSpec, TokenRejected, batch_bitmask, compile_format,  # noqa: E402
                              expand_bitmask, spec_from_request, tokenizer_info)
from kvjax.tokenizer import ByteTokenizer  # noqa: E402

MAX_TOKENS = 300

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 130}},
                 "required": ["name", "age"], "additionalProperties": False},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
        "required": ["user"], "additionalProperties": False},
    "array of enums": {"type": "array", "items": {"enum": ["red", "green", "blue", 1, None]},
                       "minItems": 1, "maxItems": 5},
    "required, const, anyOf, pattern": {"type": "object", "properties": {
        "kind": {"const": "point"},
        "x": {"type": "integer", "minimum": -5, "maximum": 5},
        "label": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "minItems": 2,
                 "maxItems": 3}},
        "required": ["kind", "x", "tags"], "additionalProperties": False},
    "$ref": {"type": "object", "$defs": {"pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"enum": ["a", "b"]}},
        "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 3}},
        "required": ["points"], "additionalProperties": False},
}
REGEXES = [r"[a-z]{2,5}(-[0-9]{1,3}){1,2}", r"(yes|no|maybe)!?", r"\d{3}\.[A-F]{2}"]
CHOICES = ["yes", "no", "maybe so", 'say "hi"', "\u00fcn\u00efcode\nline", "a\\b"]


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from kvjax.gguf import GGUFFile, GGUFTokenizer
    from test_gguf import need_packaged

    return GGUFTokenizer(GGUFFile(need_packaged("smollm2-135m-instruct")))


@pytest.fixture(scope="module", params=["byte", "smollm2"])
def tok(request):
    return request.getfixturevalue("byte_tok" if request.param == "byte" else "smol_tok")


def walk(grammar, tok, seed: int, skip_whitespace: bool = False) -> str:
    """The text of one random walk (module docstring); `skip_whitespace`: prefer tokens that
    are not pure whitespace (a walk through free JSON whitespace would rarely end)."""
    rng = np.random.default_rng(seed)
    m, eos, out = grammar.matcher(), set(tok.eos_ids), []
    for _ in range(MAX_TOKENS):
        allowed = m.allowed()
        ids = np.flatnonzero(allowed)
        assert ids.size, "a matcher must always allow some token"
        assert any(allowed[e] for e in eos) == m.done(), "EOS is allowed exactly where the grammar can end"
        if skip_whitespace:
            solid = [i for i in ids if i in eos or tok.decode([int(i)]).strip()]
            ids = np.asarray(solid) if solid else ids
        t = int(rng.choice(ids))
        if t in eos:
            return tok.decode(out)
        m.advance(t)
        out.append(t)
    pytest.fail(f"walk {seed} did not end within {MAX_TOKENS} tokens: {tok.decode(out)!r}")


def compact(spec: GrammarSpec) -> GrammarSpec:
    return GrammarSpec(spec.kind, spec.source, whitespace_flexible=False, param=spec.param)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_walks_validate(tok, name):
    schema = SCHEMAS[name]
    spec = compact(spec_from_request({"response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "t", "schema": schema}}}))
    grammar = compile_format(spec, tokenizer_info(tok))
    for seed in range(6):
        text = walk(grammar, tok, seed)
        jsonschema.validate(json.loads(text), schema)


def test_flexible_whitespace_and_json_object(tok):
    schema = SCHEMAS["nested"]
    grammar = compile_format(spec_from_request({"guided_json": json.dumps(schema)}), tokenizer_info(tok))
    for seed in range(3):
        jsonschema.validate(json.loads(walk(grammar, tok, seed, skip_whitespace=True)), schema)
    grammar = compile_format(spec_from_request({"response_format": {"type": "json_object"}}), tokenizer_info(tok))
    m = grammar.matcher()
    for t in tok.encode('{"any": [1, {"thing": null}], "b": "x"}', add_special_tokens=False):
        m.advance(t)
    assert m.done()


def _accepts(grammar, tok, text: str) -> bool:
    """Whether the grammar accepts `text` token by token (the matcher is a fresh one)."""
    m = grammar.matcher()
    for t in tok.encode(text, add_special_tokens=False):
        if not m.is_allowed(t):
            return False
        m.advance(t)
    return True


def test_numbers_are_bounded_and_the_request_schema_still_holds(byte_tok):
    """A number can no longer grow forever ("10.0000..." until max_tokens, seen on SmolLM2's
    forced tool calls): at most 16 integer digits and 9 decimals where the request's schema
    set no bound of its own, in schemas (nested, typed lists) and in json_object; the
    request's own bounds, multipleOf and data keywords are kept."""
    from kvjax.structured.matcher import NUMBER_BOUND, NUMBER_STEP, bounded_numbers

    schema = {"type": "object", "properties": {
        "x": {"type": "number"}, "n": {"type": ["integer", "null"], "minimum": 3},
        "half": {"type": "number", "multipleOf": 0.5, "maximum": 10},
        "kind": {"const": {"type": "number"}}, "list": {"type": "array", "items": {"type": "number"}}}}
    b = bounded_numbers(schema)["properties"]
    assert b["x"] == {"type": "number", "minimum": -NUMBER_BOUND, "maximum": NUMBER_BOUND, "multipleOf": NUMBER_STEP}
    assert b["n"] == {"type": ["integer", "null"], "minimum": 3, "maximum": NUMBER_BOUND}
    assert b["half"] == {"type": "number", "multipleOf": 0.5, "maximum": 10, "minimum": -NUMBER_BOUND}
    assert b["kind"] == {"const": {"type": "number"}} and b["list"]["items"]["multipleOf"] == NUMBER_STEP
    info = tokenizer_info(byte_tok)
    for req in ({"guided_json": {"type": "object", "properties": {"x": {"type": "number"}}}},
                {"response_format": {"type": "json_object"}}):
        g = compile_format(spec_from_request(req), info)
        assert _accepts(g, byte_tok, '{"x": -10.125}') and _accepts(g, byte_tok, '{"x": 123456789012345}')
        assert not _accepts(g, byte_tok, '{"x": 10.' + "0" * 40)      # runaway decimals
        assert not _accepts(g, byte_tok, '{"x": ' + "1" * 40)         # runaway integer digits
        assert _accepts(g, byte_tok, '{"x": [1.5, {"y": null}], "z": "a"}') == ("response_format" in req)


def test_compact_json_has_no_free_whitespace(byte_tok):
    spec = spec_from_request({"structured_outputs": {"json": SCHEMAS["array of enums"],
                                                     "disable_any_whitespace": True}})
    assert not spec.whitespace_flexible
    m = compile_format(spec, tokenizer_info(byte_tok)).matcher()
    assert not m.allowed()[ord(" ")] and not m.allowed()[ord("\n")]
    m.advance(ord("["))
    assert not m.allowed()[ord(" ")]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_walks_fullmatch(tok, regex):
    grammar = compile_format(spec_from_request({"guided_regex": regex}), tokenizer_info(tok))
    for seed in range(6):
        text = walk(grammar, tok, seed)
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_walks_are_choices(tok):
    for body in ({"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}):
        grammar = compile_format(spec_from_request(body), tokenizer_info(tok))
        seen = {walk(grammar, tok, seed) for seed in range(12)}
        assert seen <= set(CHOICES) and len(seen) > 1, seen


def test_grammar_spec(byte_tok):
    grammar = compile_format(spec_from_request({"structured_outputs": {"grammar": 'start: "a"+ "b"'}}),
                             tokenizer_info(byte_tok))
    for seed in range(4):
        assert re.fullmatch("a+b", walk(grammar, byte_tok, seed))


def test_disallowed_token_raises_and_keeps_state(byte_tok):
    m = compile_format(spec_from_request({"guided_choice": ["yes", "no"]}), tokenizer_info(byte_tok)).matcher()
    before = m.bitmask().copy()
    with pytest.raises(TokenRejected):
        m.advance(ord("x"))
    with pytest.raises(TokenRejected):
        m.advance(byte_tok.EOS)          # EOS before the output is complete
    np.testing.assert_array_equal(m.bitmask(), before)
    for t in b"no":
        m.advance(t)
    assert m.done() and m.finished()
    assert np.flatnonzero(m.allowed()).tolist() == [byte_tok.EOS]
    with pytest.raises(TokenRejected):
        m.advance(ord("o"))
    m.advance(byte_tok.EOS)


def test_wider_model_vocab_is_padded(byte_tok):
    info = tokenizer_info(byte_tok, vocab_size=300)
    assert tokenizer_info(byte_tok, vocab_size=300) is info and tokenizer_info(byte_tok) is not info
    m = compile_format(spec_from_request({"guided_regex": "[0-9]+"}), info).matcher()
    allowed = m.allowed()
    assert allowed.shape == (300,) and m.bitmask().shape == (10,)
    assert np.flatnonzero(allowed).tolist() == list(range(ord("0"), ord("9") + 1))
    with pytest.raises(TokenRejected):
        m.advance(299)
    m.advance(ord("7"))
    assert m.allowed()[byte_tok.EOS] and not m.allowed()[259:].any()


def test_copy_rollback_and_batch(byte_tok):
    grammar = compile_format(spec_from_request({"guided_regex": "ab(c|d)e"}), tokenizer_info(byte_tok))
    m = grammar.matcher()
    m.advance(ord("a"))
    after_a = m.bitmask().copy()
    fork = m.copy()
    for t in b"bc":
        m.advance(t)
    m.rollback(2)
    np.testing.assert_array_equal(m.bitmask(), after_a)
    fork.advance(ord("b"))
    out = np.zeros((3, grammar.info.mask_words), np.int32)
    batch_bitmask([m, None, fork], out)
    np.testing.assert_array_equal(out[0], after_a)
    assert (out[1] == -1).all()
    np.testing.assert_array_equal(out[2], fork.bitmask())
    assert np.flatnonzero(expand_bitmask(out, byte_tok.vocab_size)[2]).tolist() == [ord("c"), ord("d")]


def test_device_mask_matches_host(byte_tok):
    from kvjax.structured.device import mask_logits, unpack_bitmask

    m = compile_format(spec_from_request({"guided_regex": "[a-f]x"}), tokenizer_info(byte_tok, 270)).matcher()
    bits = np.stack([m.bitmask(), np.full_like(m.bitmask(), -1)])
    np.testing.assert_array_equal(np.asarray(unpack_bitmask(bits, 270)), expand_bitmask(bits, 270))
    logits = np.asarray(mask_logits(np.zeros((2, 270), np.float32), bits))
    assert np.flatnonzero(np.isfinite(logits[0])).tolist() == list(range(ord("a"), ord("f") + 1))
    assert np.isfinite(logits[1]).all()


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 2]}, "guided_choice"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": "yes"}}, "structured_outputs.disable_any_whitespace"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_grammar": ""}, "guided_grammar"),
])
def test_malformed_fields_name_their_param(body, param):
    with pytest.raises(FormatError) as e:
        spec_from_request(body)
    assert e.value.param == param and isinstance(e.value, ValueError), (e.value.param, str(e.value))


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a(?=b)"}}, "structured_outputs.regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}},
     "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
])
def test_engine_rejections_name_their_param(byte_tok, body, param):
    spec = spec_from_request(body)
    with pytest.raises(FormatError) as e:
        compile_format(spec, tokenizer_info(byte_tok))
    assert e.value.param == param, (e.value.param, str(e.value))


def test_request_fields_map_to_specs():
    assert spec_from_request({}) is None
    assert spec_from_request({"response_format": {"type": "text"}}) is None
    assert spec_from_request({"structured_outputs": {"json_object": False}}) is None
    s = spec_from_request({"response_format": {"type": "json_schema", "json_schema": {"schema": {"b": 1, "a": 2}}}})
    assert (s.kind, s.source, s.param) == ("json_schema", '{"b":1,"a":2}', "response_format.json_schema.schema")
    assert s == spec_from_request({"guided_json": '{"b": 1, "a": 2}'})        # the same grammar (cache key)
    assert spec_from_request({"structured_outputs": {"json_object": True}}).kind == "json_object"
    s = spec_from_request({"guided_regex": "a+", "guided_whitespace_pattern": " ?"})
    assert (s.kind, s.source, s.whitespace_pattern) == ("regex", "a+", " ?")
    s = spec_from_request({"structured_outputs": {"choice": ["x"], "disable_any_whitespace": True}})
    assert (s.kind, json.loads(s.source), s.whitespace_flexible) == ("choice", ["x"], False)


def test_compile_is_cached(byte_tok, smol_tok):
    spec = spec_from_request({"guided_json": SCHEMAS["nested"]})
    info = tokenizer_info(byte_tok)
    assert compile_format(spec, info) is compile_format(spec_from_request({"guided_json": SCHEMAS["nested"]}), info)
    assert compile_format(spec, tokenizer_info(smol_tok)) is not compile_format(spec, info)
