"""Presses that score a token from its own key (or its place): Knorm, KeyDiff, StreamingLLM, Random.

Axis letters: B batch, T chunk tokens, K kv heads, H head dim.

They need no query, so DecodingPress can also apply them to a whole cache (`score_cache`:
keys [B, K, S, H] with validity and positions per slot).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .base import LayerInputs, ScorerPress, check_ratio, heads_first


def _knorm(keys):             # [..., H] -> [...]
    return -jnp.linalg.norm(keys.astype(jnp.float32), axis=-1)


def _keydiff(keys, valid):    # keys [B, K, S, H], valid [B, K, S] -> [B, K, S]
    k = keys.astype(jnp.float32)
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    w = valid[..., None].astype(jnp.float32)
    anchor = (unit * w).sum(2, keepdims=True) / jnp.maximum(w.sum(2, keepdims=True), 1.0)
    dot = (k * anchor).sum(-1)
    norms = jnp.linalg.norm(k, axis=-1) * jnp.linalg.norm(anchor, axis=-1)
    return -dot / jnp.maximum(norms, 1e-8)


@dataclass(frozen=True)
class KnormPress(ScorerPress):
    """Keeps the keys of smallest L2 norm (Devoto et al. 2024): score = -||k||."""
    compression_ratio: float = 0.0

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    def score(self, inp: LayerInputs):
        return _knorm(heads_first(inp.k))

    def score_cache(self, keys, values, pos, valid, layer, key):
        return _knorm(keys)


@dataclass(frozen=True)
class KeyDiffPress(ScorerPress):
    """Keeps the keys least similar to the mean normalised key: score = -cos(k, anchor)."""
    compression_ratio: float = 0.0

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    def score(self, inp: LayerInputs):
        valid = jnp.broadcast_to(inp.valid[:, None, :], inp.k.shape[:1] + inp.k.shape[2:3] + inp.k.shape[1:2])
        return _keydiff(heads_first(inp.k), valid)

    def score_cache(self, keys, values, pos, valid, layer, key):
        return _keydiff(keys, valid)


@dataclass(frozen=True)
class StreamingLLMPress(ScorerPress):
    """The first `n_sink` tokens and the most recent ones (Xiao et al. 2023). Kept tokens keep
    their original positions (wrap in KeyRerotationPress to re-position them, as the paper does)."""
    compression_ratio: float = 0.0
    n_sink: int = 4

    def __post_init__(self):
        check_ratio(self.compression_ratio)
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")

    def check_lengths(self, n):
        if (np.asarray(n) <= self.n_sink).any():
            raise ValueError(f"StreamingLLMPress(n_sink={self.n_sink}) needs every row longer than "
                             f"n_sink; got a row of {int(np.min(n))} tokens")

    def score(self, inp: LayerInputs):
        B, T, K = inp.k.shape[:3]
        t = jnp.arange(T, dtype=jnp.float32)[None, None, :]
        score = jnp.where(t < self.n_sink, float(2 ** 30), t)       # sinks first, then recency
        return jnp.broadcast_to(score, (B, K, T))

    def score_cache(self, keys, values, pos, valid, layer, key):
        p = pos.astype(jnp.float32)
        return jnp.where(pos < self.n_sink, float(2 ** 30), p)


@dataclass(frozen=True)
class RandomPress(ScorerPress):
    """Random scores from a JAX key (seed, layer): the baseline every press must beat."""
    compression_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    def score(self, inp: LayerInputs):
        B, T, K = inp.k.shape[:3]
        key = jax.random.fold_in(jax.random.key(self.seed), inp.layer)
        return jax.random.uniform(key, (B, K, T))

    def score_cache(self, keys, values, pos, valid, layer, key):
        return jax.random.uniform(jax.random.fold_in(key, layer), valid.shape)
