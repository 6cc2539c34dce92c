"""The engine's public request/response types (the contract `kvjax.Engine` and `kvjax serve` share).

SamplingParams: what one request asks for. Completion: what it got. RequestHandle: an
in-flight request, iterated for its tokens as they are produced (the server streams these).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (validated by `check`, before anything runs).

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters. stop_token_ids:
    generation ends after emitting any of them (the stop token is included in the output).
    seed: a request's own random stream (None: derived from the engine's key and the
    request id); the same seed and prompt give the same tokens whatever else is in flight.
    logprobs: None, or k >= 0: the log-probability of each generated token and the k most
    likely alternatives. prompt_logprobs: None, or k >= 0: the same for every prompt token
    after the first (scoring given text). Neither costs anything when None.

    Logit controls (kvjax/controls.py; a call whose rows all keep the defaults runs the plain
    program and pays nothing for them): presence_penalty / frequency_penalty in [-2, 2]
    (OpenAI's: subtracted once / per occurrence from the logits of tokens already generated),
    repetition_penalty > 0 (1 disables; Hugging Face's and vLLM's: the logit of a token seen in
    the prompt or the output is divided by it when positive, multiplied when negative),
    logit_bias ({token id: bias in [-100, 100]} added to the logits), min_p in [0, 1] (drops
    tokens less likely than min_p times the most likely one), min_tokens (the stop tokens
    cannot be sampled before this many tokens are generated; at most max_tokens). There is
    no ignore_eos here: the engine stops only at `stop_token_ids`, so leaving the model's EOS
    out of them is ignoring it (`kvjax serve` does that for `ignore_eos`).

    guide: None, or a compiled grammar (`kvjax.structured.compile_format(spec,
    tokenizer_info(tok, cfg.vocab_size))`): every token is drawn from the tokens the grammar
    allows next (a mask computed on the host each step), and the request ends ("stop") when
    only EOS could follow. Such a request steps once per host round trip and never speculates.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    guide: object = None


@dataclass
class TokenLogprob:
    """One position's log-probability: the chosen token's, and the top alternatives
    (token id -> log-probability, most likely first)."""

    token: int
    logprob: float
    top: dict = field(default_factory=dict)


@dataclass
class Completion:
    """One finished request, in the order the prompts were given."""

    tokens: list                  # generated token ids, a stop token included
    finish_reason: str            # "stop" (a stop token) | "length" (max_tokens) | "abort" (cancelled)
    prompt_tokens: int            # prompt length
    cached_tokens: int = 0        # prompt tokens served from the prefix cache (not computed)
    logprobs: list | None = None          # list[TokenLogprob] per generated token, if asked
    prompt_logprobs: list | None = None   # list[TokenLogprob | None] per prompt token (None first), if asked
    request_id: int = -1
