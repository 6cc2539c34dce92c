"""The honest no-cache baseline of `generate(use_cache=False)`: every new token re-runs the
model over its whole prefix (O(n^2) token-passes), with prefix widths bucketed to powers of two.

Axis letters: B batch, S prompt width, N new tokens.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..buckets import pow2
from ..sampling import Knobs, start_counts
from .programs import GenerateOutput, nocache_step_program


def generate_nocache(cfg, params, tok, lens, max_new_tokens: int, knobs: Knobs) -> GenerateOutput:
    """tokens [B, S] (host), lens [B] -> GenerateOutput without a cache (cache None)."""
    B, S = tok.shape
    width = int(lens.max()) + max_new_tokens
    n = min(S, width)
    buf = jnp.zeros((B, width), jnp.int32).at[:, :n].set(jnp.asarray(tok[:, :n], jnp.int32))
    cur, done = jnp.asarray(lens), jnp.zeros((B,), bool)
    counts = start_counts(knobs, B, cfg.vocab_size)
    toks, actives = [], []
    longest = int(lens.max())  # known on the host: no device sync inside the loop
    for i in range(max_new_tokens):
        w = pow2(longest + i, cap=width)
        buf, cur, done, t, a, counts = nocache_step_program(cfg, w, params, buf, cur, done, jnp.int32(i), knobs,
                                                            counts)
        toks.append(t)
        actives.append(a)
    return GenerateOutput(jnp.stack(toks, 1), jnp.stack(actives, 1).sum(1, dtype=jnp.int32), None)
