"""Compiled grammars and per-request matchers: the token mask of every decoding step, on the host.

    info = tokenizer_info(tok, cfg.vocab_size)      # once per tokenizer (kvjax.structured.vocab)
    grammar = compile_format(spec, info)            # cached per (spec, tokenizer); FormatError
    m = grammar.matcher()                           # one per request (a copy of a compiled root)
    bits = m.bitmask()                              # int32 [ceil(V/32)]: bit t of word t//32
    mask = m.allowed()                              # or bool [V], the same mask unpacked
    m.advance(token)                                # TokenRejected if the mask did not allow it
    m.done()                                        # the grammar accepts here: EOS is allowed

Design. The grammar runs on the host (llguidance: a lazily built lexer DFA plus an Earley
parser, walked over the token trie; nothing is precomputed, so a new schema compiles in
milliseconds; a mask costs 10-30 us at the median at vocabularies of 49k and 262k tokens,
up to a few ms at 262k inside strings with a maxLength: benchmarks/grammar_engines.py).
Each step, for each constrained row, the engine asks for the mask before sampling, sends it
to the device and masks the logits there (-inf outside it: kvjax.structured.device),
samples, and advances the row's matcher with the sampled token. The packed bitmask is 32 times smaller than a bool [V] mask (32 KiB a row at
V=262,144) and is what should travel; `batch_bitmask` fills a [B, W] array for a whole
batch, unconstrained rows all ones. EOS ids are in the mask only where the grammar can end;
where nothing else can follow (`finished()`), EOS is the only token allowed. Ids past the
tokenizer's vocabulary (a wider model) are never allowed.

`copy()` forks a matcher and `rollback(n)` undoes its last n tokens (speculative decoding:
advance through draft tokens, roll back the rejected ones).
"""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from .formats import FormatError, GrammarSpec
from .vocab import TokenizerInfo, engine


class TokenRejected(ValueError):
    """advance() got a token the grammar does not allow here."""


# JSON's free whitespace, bounded: a small model can otherwise pad a gap with spaces or
# newlines until max_tokens (seen: the bundled byte model under vLLM's unbounded default)
# and never finish the document. 20 characters per gap still indents deep nesting.
BOUNDED_WHITESPACE = r"[ \t\n\r]{0,20}"


# JSON numbers, bounded the same way: SmolLM2 forcing a tool call wrote "10.0000..." until
# max_tokens (2 of 10 calls), a number JSON allows to grow forever. Every number or integer
# schema without its own bounds gets |x| <= NUMBER_BOUND (at most 16 integer digits), and
# numbers without a multipleOf get NUMBER_STEP (at most 9 decimals, no exponent). The
# output then still validates against the request's schema: only values it allows, fewer.
NUMBER_BOUND = 10 ** 15
NUMBER_STEP = 1e-9
_DATA_KEYWORDS = ("enum", "const", "default", "examples")    # values, not schemas


def bounded_numbers(node):
    """A copy of the JSON schema `node` with bounded numbers (see NUMBER_BOUND)."""
    if isinstance(node, list):
        return [bounded_numbers(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _DATA_KEYWORDS else bounded_numbers(v)) for k, v in node.items()}
    kinds = out.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if kinds & {"number", "integer"}:
        low, high = out.get("minimum", out.get("exclusiveMinimum")), out.get("maximum", out.get("exclusiveMaximum"))
        if low is None and not (isinstance(high, (int, float)) and high < -NUMBER_BOUND):
            out["minimum"] = -NUMBER_BOUND
        if high is None and not (isinstance(low, (int, float)) and low > NUMBER_BOUND):
            out["maximum"] = NUMBER_BOUND
        if "number" in kinds and "multipleOf" not in out:
            out["multipleOf"] = NUMBER_STEP
    return out


# response_format json_object: any JSON object, its numbers bounded as above
ANY_JSON_OBJECT = {"$defs": {"value": {"anyOf": [
    {"type": "null"}, {"type": "boolean"}, {"type": "number"}, {"type": "string"},
    {"type": "array", "items": {"$ref": "#/$defs/value"}},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}]}},
    "type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}


def grammar_text(spec: GrammarSpec) -> str:
    """The spec as an llguidance grammar (its JSON grammar format)."""
    llg = engine()
    if spec.kind in ("json_schema", "json_object"):
        options = {"whitespace_flexible": spec.whitespace_flexible}
        if spec.whitespace_flexible:
            options["whitespace_pattern"] = spec.whitespace_pattern or BOUNDED_WHITESPACE
        try:
            raw = json.loads(spec.source) if spec.kind == "json_schema" else ANY_JSON_OBJECT
        except ValueError as e:
            raise FormatError(spec.param, f"{spec.param}: not JSON: {e}") from None
        schema = json.dumps(bounded_numbers(raw))
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise FormatError(spec.param, f"{spec.param}: {e}") from None
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(c) for c in json.loads(spec.source))
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    try:
        return llg.grammar_from("grammar", spec.source)
    except ValueError as e:
        raise FormatError(spec.param, f"{spec.param}: {e}") from None


def what(spec: GrammarSpec) -> str:
    return {"json_schema": "JSON Schema", "json_object": "JSON object", "regex": "regular expression",
            "choice": "choice list", "grammar": "grammar"}[spec.kind]


class Grammar:
    """A spec compiled for one tokenizer; `matcher()` gives each request its own state."""

    def __init__(self, spec: GrammarSpec, info: TokenizerInfo):
        llg = engine()
        self.spec, self.info = spec, info
        root = llg.LLMatcher(info.ll, grammar_text(spec), log_level=0)
        if root.is_error():
            raise FormatError(spec.param, f"{spec.param}: the {what(spec)} cannot be used: {root.get_error()}")
        self.root = root
        self.warnings = root.get_grammar_warnings()

    def matcher(self) -> "Matcher":
        return Matcher(self.info, self.root.deep_copy())


@lru_cache(maxsize=128)
def compile_cached(spec: GrammarSpec, info: TokenizerInfo) -> Grammar:
    return Grammar(spec, info)


def compile_format(spec: GrammarSpec, info: TokenizerInfo) -> Grammar:
    """The Grammar of `spec` for a tokenizer (cached for the last 128 (spec, tokenizer) pairs).
    FormatError (naming spec.param) when the engine rejects the schema, regex or grammar."""
    return compile_cached(spec, info)


class Matcher:
    """One request's position in its grammar (see the module docstring)."""

    def __init__(self, info: TokenizerInfo, ll):
        self.info, self.ll = info, ll
        self.vocab_size = info.vocab_size

    def check(self):
        if self.ll.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.ll.get_error()}")

    def bitmask(self, out: np.ndarray | None = None) -> np.ndarray:
        """The allowed next tokens, packed: int32 [ceil(V/32)], bit t%32 of word t//32."""
        if out is None:
            out = np.empty(self.info.mask_words, np.int32)
        elif out.dtype != np.int32 or out.shape != (self.info.mask_words,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous int32 [{self.info.mask_words}] array, got "
                             f"{out.dtype} {out.shape}")
        n = self.info.engine_words
        self.ll.unsafe_compute_mask_ptr(out.ctypes.data, 4 * n)
        out[n:] = 0
        self.check()
        return out

    def allowed(self, out: np.ndarray | None = None) -> np.ndarray:
        """The allowed next tokens as bool [V] (into `out` when given)."""
        return expand_bitmask(self.bitmask(), self.vocab_size, out)

    def is_allowed(self, token: int) -> bool:
        token = int(token)
        if token in self.info.eos_ids:        # validate_tokens says no to EOS once stopped
            return self.ll.is_accepting()
        return 0 <= token < self.info.tokenizer_vocab and self.ll.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        """Take `token` as the next output token; TokenRejected (state unchanged) if not allowed."""
        if not self.is_allowed(token):
            self.check()
            raise TokenRejected(f"token {int(token)} is not allowed by the grammar here")
        if not self.ll.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher failed on token {int(token)}: {self.ll.get_error()}")

    def done(self) -> bool:
        """Whether the output so far is complete: the grammar accepts, EOS is allowed."""
        return self.ll.is_accepting()

    def finished(self) -> bool:
        """Whether nothing but EOS can follow (the engine may end the row without sampling)."""
        return self.ll.is_stopped()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next, whatever the model says (may be empty)."""
        return list(self.ll.compute_ff_tokens())

    def copy(self) -> "Matcher":
        return Matcher(self.info, self.ll.deep_copy())

    def rollback(self, n: int) -> None:
        """Undo the last `n` advanced tokens."""
        if n and not self.ll.rollback(int(n)):
            raise ValueError(f"cannot roll back {n} tokens: {self.ll.get_error()}")


def expand_bitmask(bits: np.ndarray, vocab_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Packed int32 bitmask(s) [..., W] -> bool [..., vocab_size] (into `out` when given)."""
    bits = np.ascontiguousarray(bits, dtype="<i4")
    flat = np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[..., :vocab_size].view(np.bool_)
    if out is None:
        return flat
    out[...] = flat
    return out


_EXECUTORS: dict = {}


def batch_bitmask(matchers: list, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Fill `out` (int32 [B, W], contiguous) with each row's mask; rows whose matcher is None
    get all ones (unconstrained). The rows are computed on `threads` threads (llguidance's
    executor; None: its default) with the GIL released."""
    rows = [(m.ll, i) for i, m in enumerate(matchers) if m is not None]
    if out.dtype != np.int32 or out.ndim != 2 or len(matchers) != out.shape[0] or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous int32 [{len(matchers)}, W] array, got {out.dtype} {out.shape}")
    out[[i for i, m in enumerate(matchers) if m is None]] = -1
    if not rows:
        return out
    info = matchers[rows[0][1]].info
    if out.shape[1] != info.mask_words:
        raise ValueError(f"out has {out.shape[1]} words a row, the masks {info.mask_words}")
    if threads not in _EXECUTORS:
        _EXECUTORS[threads] = engine().LLExecutor(threads)
    n = info.engine_words
    target = out if n == info.mask_words else np.zeros((out.shape[0], n), np.int32)
    _EXECUTORS[threads].unsafe_compute_mask_ptr(rows, target.ctypes.data, n * 4, out.shape[0])
    if target is not out:
        done = [i for _, i in rows]
        out[done, :n] = target[done]
        out[done, n:] = 0
    return out
