"""Request fields -> one `GrammarSpec`, checked, with errors that name the field.

The OpenAI and vLLM ways to ask for structured output, all read by `spec_from_request(body)`:

  response_format   {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
                    object), {"type": "json_schema", "json_schema": {"name": ..., "schema":
                    {...}, "strict": true}}
  guided_json       a JSON Schema (an object, or its JSON text)        vLLM's older fields
  guided_regex      a regular expression the whole output must match
  guided_choice     a list of strings, the output is exactly one of them
  guided_grammar    a Lark (or llama.cpp GBNF) grammar
  guided_whitespace_pattern   the whitespace allowed between JSON tokens (a regex)
  structured_outputs {"json": ..., "regex": ..., "choice": [...], "grammar": ...,
                    "json_object": true} plus the options "disable_any_whitespace" (JSON
                    without free whitespace: `{"a":1}`), "whitespace_pattern" and
                    "disable_fallback" (accepted, nothing to fall back from)  vLLM's newer field

At most one constraint per request. Anything wrong is a `FormatError(param, message)` (a
ValueError whose `.param` is the field's path, e.g. "response_format.json_schema.schema") so
a server answers 400 naming it. This module checks shapes and types only; a schema the grammar
engine cannot compile, or a regex it cannot parse, is found by `compile_format`
(kvjax.structured.matcher), which raises the same FormatError with the spec's `param`.

A `GrammarSpec` is frozen and hashable (the field it came from is not part of its identity),
so compiled grammars are cached per (spec, tokenizer). JSON Schema key order is kept: it is
the order in which the properties are generated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}
STRUCTURED_OPTIONS = ("disable_any_whitespace", "whitespace_pattern", "disable_fallback")


class FormatError(ValueError):
    """A structured-output request field that cannot be used; `.param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match.

    kind: one of KINDS. source: the schema as JSON text ("json_schema"), the regex, the
    choices as a JSON list, the grammar text, or "" ("json_object"). whitespace_flexible:
    whether JSON may hold free whitespace between tokens (vLLM's default; False is
    `disable_any_whitespace`). whitespace_pattern: a regex for that whitespace instead.
    param: the request field the spec came from (error messages; not part of equality).
    """
    kind: str
    source: str = ""
    whitespace_flexible: bool = True
    whitespace_pattern: str | None = None
    param: str = field(default="response_format", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FormatError(self.param, f"unknown constraint kind {self.kind!r}; expected one of {KINDS}")


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    """A JSON Schema given as an object or as its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise FormatError(param, f"{param} is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if schema is False:
        raise FormatError(param, f"{param} is false: no output satisfies it")
    if not isinstance(schema, dict):
        raise FormatError(param, f"{param} must be a JSON Schema object, got {type(schema).__name__}")
    return GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")), param=param)


def regex_spec(regex: Any, param: str) -> GrammarSpec:
    if not isinstance(regex, str):
        raise FormatError(param, f"{param} must be a string (a regular expression), got {type(regex).__name__}")
    return GrammarSpec("regex", regex, param=param)


def choice_spec(choices: Any, param: str) -> GrammarSpec:
    if not isinstance(choices, (list, tuple)):
        raise FormatError(param, f"{param} must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise FormatError(param, f"{param} is empty; give at least one string to choose from")
    bad = [i for i, c in enumerate(choices) if not isinstance(c, str)]
    if bad:
        raise FormatError(param, f"{param}[{bad[0]}] must be a string, got {type(choices[bad[0]]).__name__}")
    return GrammarSpec("choice", json.dumps(list(choices), ensure_ascii=False), param=param)


def grammar_spec(text: Any, param: str) -> GrammarSpec:
    if not isinstance(text, str) or not text.strip():
        raise FormatError(param, f"{param} must be a non-empty string (a Lark or GBNF grammar)")
    return GrammarSpec("grammar", text, param=param)


def make_spec(kind: str, value: Any, param: str) -> GrammarSpec | None:
    """The spec of one constraint field; None for json_object=False."""
    if kind == "json_schema":
        return json_schema_spec(value, param)
    if kind == "regex":
        return regex_spec(value, param)
    if kind == "choice":
        return choice_spec(value, param)
    if kind == "grammar":
        return grammar_spec(value, param)
    if not isinstance(value, bool):
        raise FormatError(param, f"{param} must be true or false, got {type(value).__name__}")
    return GrammarSpec("json_object", "", param=param) if value else None


def from_response_format(rf: Any, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI's response_format: None for type "text"."""
    if not isinstance(rf, Mapping):
        raise FormatError(param, f"{param} must be an object with a 'type', got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", param=param)
    if kind != "json_schema":
        raise FormatError(f"{param}.type", f"{param}.type must be 'text', 'json_object' or 'json_schema', "
                                           f"got {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, Mapping):
        raise FormatError(f"{param}.json_schema", f"{param}.json_schema must be an object holding the 'schema'")
    if js.get("schema") is None:
        raise FormatError(f"{param}.json_schema.schema", f"{param}.json_schema.schema is missing: give the "
                                                         f"JSON Schema, or use type 'json_object' for any object")
    return json_schema_spec(js["schema"], f"{param}.json_schema.schema")


def from_structured_outputs(so: Any, param: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's structured_outputs object: one constraint key plus whitespace options."""
    if not isinstance(so, Mapping):
        raise FormatError(param, f"{param} must be an object, got {type(so).__name__}")
    unknown = [k for k in so if k not in STRUCTURED_KEYS and k not in STRUCTURED_OPTIONS]
    if unknown:
        raise FormatError(f"{param}.{unknown[0]}", f"{param}.{unknown[0]} is not supported; supported keys: "
                                                   f"{sorted(STRUCTURED_KEYS) + list(STRUCTURED_OPTIONS)}")
    specs = [s for k, kind in STRUCTURED_KEYS.items() if so.get(k) is not None
             for s in [make_spec(kind, so[k], f"{param}.{k}")] if s is not None]
    if len(specs) > 1:
        raise FormatError(specs[1].param, f"{param} may hold one of {sorted(STRUCTURED_KEYS)}; got "
                                          f"{specs[0].param} and {specs[1].param}")
    if not specs:
        return None
    disable = so.get("disable_any_whitespace")
    if disable is not None and not isinstance(disable, bool):
        raise FormatError(f"{param}.disable_any_whitespace", f"{param}.disable_any_whitespace must be true or false")
    return with_pattern(replace(specs[0], whitespace_flexible=not disable), so.get("whitespace_pattern"),
                        f"{param}.whitespace_pattern")


def with_pattern(spec: GrammarSpec, pattern, param: str) -> GrammarSpec:
    """The spec with JSON whitespace matching the regex `pattern` (None: unchanged)."""
    if pattern is None:
        return spec
    if not isinstance(pattern, str):
        raise FormatError(param, f"{param} must be a string (a regular expression)")
    return replace(spec, whitespace_pattern=pattern)


def spec_from_request(body: Mapping) -> GrammarSpec | None:
    """The one structured-output constraint a request body asks for (None: none).

    Reads response_format, guided_json / guided_regex / guided_choice / guided_grammar (+
    guided_whitespace_pattern) and structured_outputs; FormatError when one is malformed or
    more than one constraint is given."""
    specs = []
    if body.get("response_format") is not None:
        specs.append(from_response_format(body["response_format"]))
    for name, kind in GUIDED_FIELDS.items():
        if body.get(name) is not None:
            specs.append(make_spec(kind, body[name], name))
    if body.get("structured_outputs") is not None:
        specs.append(from_structured_outputs(body["structured_outputs"]))
    specs = [s for s in specs if s is not None]
    if len(specs) > 1:
        raise FormatError(specs[1].param, f"one structured-output constraint per request; got {specs[0].param} "
                                          f"and {specs[1].param}")
    if not specs:
        return None
    return with_pattern(specs[0], body.get("guided_whitespace_pattern"), "guided_whitespace_pattern")
