"""Structured output: the model's text constrained to a JSON Schema, a regex, a choice or a grammar.

  formats.py   request fields (OpenAI response_format, vLLM guided_* and structured_outputs)
               -> a GrammarSpec; FormatError(param, message) for anything malformed
  vocab.py     a kvjax tokenizer -> the grammar engine's tokenizer (token bytes, EOS ids,
               mask width), cached per tokenizer
  matcher.py   compile_format(spec, info) -> Grammar (cached per (spec, tokenizer));
               grammar.matcher() -> Matcher, one per request: bitmask()/allowed(),
               advance(token), done(), finished(), copy(), rollback(n); batch_bitmask
  device.py    unpack_bitmask / mask_logits: the packed masks applied to logits in JAX

The design: a per-step mask computed on the host (llguidance, tens of microseconds a token
at vocabularies of 49k and 262k, see benchmarks/grammar_engines.py), sent to the device as a
packed bitmask (or bool [V]) and applied to the logits before sampling; EOS is allowed only
where the grammar can end, so a constrained row stops exactly when its output is complete.
llguidance is an optional dependency (`pip install 'kvjax[structured]'`): formats.py works
without it; compiling a spec raises ImportError with the install command.
"""
from .formats import FormatError, GrammarSpec, from_response_format, from_structured_outputs, spec_from_request
from .matcher import Grammar, Matcher, TokenRejected, batch_bitmask, compile_format, expand_bitmask
from .vocab import TokenizerInfo, tokenizer_info

__all__ = ["FormatError", "GrammarSpec", "spec_from_request", "from_response_format", "from_structured_outputs",
           "Grammar", "Matcher", "TokenRejected", "compile_format", "expand_bitmask", "batch_bitmask",
           "TokenizerInfo", "tokenizer_info"]
