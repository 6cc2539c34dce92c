"""Timed programs for benchmarks: generate's decode loop, prefill and one decode step, each
measured on its own with `kvjax.timing.measure` (warm, calibrated, repeated, synchronised).

Axis letters: B batch, T prompt width, N decode steps.

The decode figure is the decode program `generate` runs (`decode._decode_loop`: a
`lax.scan` of N greedy steps on a donated cache, with the same live-prefix plan), timed
end to end on a cache prefilled once outside the timed region. Each timed call rewinds
the cache's per-row lengths to the prompt's (the buffers are reused; tokens past a row's
length are masked out, so every call does exactly the same work at the same live context)
and runs N steps. Prefill is timed the same way on its own (lengths rewound to 0).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from . import validate
from .cache import KVCache
from .config import ModelConfig
from .decode import decode_loop_program, decode_program, live_bucket, live_plan, prefill, prefill_program
from .sampling import Knobs
from .timing import Timing, measure


def _rewound(cache: KVCache, lengths: np.ndarray) -> KVCache:
    return dataclasses.replace(cache, lengths=jnp.asarray(lengths, jnp.int32))


def time_prefill(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, **measure_kw):
    """Timing of `prefill(tokens, lengths)` into an empty `cache` (one call = one prefill)."""
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_cache(cfg, cache, tok.shape[0])
    validate.check_room(cfg, np.zeros_like(lens), lens, cache.max_len, "time_prefill", cache.bounded)
    live = live_bucket(int(lens.max()), cache.max_len) if cache.bounded else None
    zeros = np.zeros_like(lens)
    tok_d, lens_d = jnp.asarray(tok, jnp.int32), jnp.asarray(lens)

    def call(state):
        return prefill_program(cfg, params, tok_d, lens_d, _rewound(state[1], zeros), live)

    (_, cache), t = measure(call, (None, cache), **measure_kw)
    return cache, t


def time_decode(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, steps: int,
                **measure_kw) -> tuple[KVCache, Timing]:
    """Per-step Timing of generate's decode loop: `steps` greedy steps after the prompt.

    The prompt is prefilled once (untimed) into `cache`, which must hold prompt + steps
    tokens for bounded kinds. Returns (the cache after the last call, Timing per step).
    """
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_room(cfg, lens, np.full_like(lens, steps), cache.max_len, "time_decode", cache.bounded)
    logits, cache = prefill(cfg, params, tok, lens, cache)
    used = np.asarray(cache.lengths)
    _, segments = live_plan(int(used.max()), int(steps), cache)
    knobs = Knobs.make(cfg.vocab_size, tok.shape[0])

    def call(cache):
        out, _ = decode_loop_program(cfg, params, logits, _rewound(cache, used), segments, knobs)
        return out.cache

    return measure(call, cache, units=steps, **measure_kw)


def time_decode_step(cfg: ModelConfig, params, cache: KVCache, at: int, seed: int = 0,
                     **measure_kw) -> tuple[KVCache, Timing]:
    """Timing of one `decode_step` (check=False: reads every slot) writing position `at`.

    Each call rewinds every row to `at` tokens, so the step always attends over at + 1
    tokens. `cache` only provides the buffers (its contents do not change the cost).
    """
    if not 0 <= at < cache.max_len:
        raise ValueError(f"time_decode_step: position at={at} is outside the cache's "
                         f"max_len={cache.max_len}")
    B = cache.batch_size
    tok = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B,)), jnp.int32)
    at_rows = np.full((B,), at, np.int32)

    def call(cache):
        return decode_program(cfg, params, tok, _rewound(cache, at_rows), None)[1]

    return measure(call, cache, **measure_kw)
