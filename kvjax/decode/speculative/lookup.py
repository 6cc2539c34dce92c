"""Prompt lookup (n-gram) proposals computed on device inside the decode loop.

Axis letters: B batch, H history capacity, k proposed tokens.

A row's history is its prompt and every token it has emitted. The proposal copies the k
tokens that followed the most recent earlier occurrence of the history's last n tokens,
trying n = max_ngram down to min_ngram and taking the longest n that matches anywhere
(the most recent occurrence among those). Rows with no match propose nothing (n_valid 0)
and step as plain decoding does.
"""
from __future__ import annotations

import jax.numpy as jnp


def propose(hist, hist_len, num_tokens: int, max_ngram: int, min_ngram: int = 1):
    """(drafts int32 [B, k], n_valid int32 [B]) from histories hist [B, H] holding hist_len [B]
    tokens each (num_tokens, max_ngram, min_ngram static). A draft is hist[j + n : j + n + k]
    for the largest j < len - n whose n tokens equal the last n of the history, so that at
    least one continuation token exists; n_valid counts the copied tokens that lie inside the
    history (fewer than k near its end)."""
    B, H = hist.shape
    k = num_tokens
    pad = jnp.concatenate([hist, jnp.zeros((B, max_ngram + k), hist.dtype)], axis=1)   # [B, H + n + k]
    j = jnp.arange(H, dtype=jnp.int32)[None, :]                                        # [1, H]
    start = jnp.full((B,), -1, jnp.int32)       # where the copied run begins (j + n), -1: none yet
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > H:
            continue
        tail = jnp.take_along_axis(pad, jnp.maximum(hist_len[:, None] - n, 0) + jnp.arange(n)[None, :], axis=1)
        eq = jnp.ones((B, H), bool)
        for i in range(n):                     # window j matches when hist[j + i] == tail[i] for all i
            eq = eq & (pad[:, i:i + H] == tail[:, i:i + 1])
        ok = eq & (j + n < hist_len[:, None]) & (hist_len[:, None] >= n)
        found = jnp.max(jnp.where(ok, j, -1), axis=1)                                 # latest match
        start = jnp.where((start < 0) & (found >= 0), found + n, start)
    cols = jnp.maximum(start, 0)[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    drafts = jnp.take_along_axis(pad, cols, axis=1).astype(jnp.int32)
    n_valid = jnp.where(start >= 0, jnp.clip(hist_len - start, 0, k), 0).astype(jnp.int32)
    return drafts, n_valid
