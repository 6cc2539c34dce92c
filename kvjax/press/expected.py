"""ExpectedAttentionPress: the attention future queries are expected to pay each key.

Axis letters: B batch, T chunk tokens, F future positions, K kv heads, N query heads,
G = N / K, H head dim.

From the mean and covariance of the chunk's queries before rotary (sinks excluded), the
rotation averaged over the next `n_future_positions` positions gives the expected future
query mu' and its covariance S'; a key's expected logit is k.mu'/sqrt(H) + k'S'k/(2H), a
softmax over keys turns that into expected attention, and the value's norm weights it
(kvpress 0.5.5, ExpectedAttentionPress).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .base import LayerInputs, ScorerPress, always_keep, check_ratio, group_mean


def averaged_rotation(start: jax.Array, n_future: int, inv_freq: jax.Array | None, H: int) -> jax.Array:
    """float32 [B, H, H]: mean over p in [start_b, start_b + F) of the rotary matrix R(p)
    (half-split layout: R x = x cos + rotate_half(x) sin). Identity without rotary.
    inv_freq: [R/2], or per row [B, R/2] (longrope); with R < H (partial rotary) the last
    H - R dims pass unrotated."""
    B = start.shape[0]
    eye = jnp.broadcast_to(jnp.eye(H, dtype=jnp.float32), (B, H, H))
    if inv_freq is None:
        return eye
    inv = inv_freq if inv_freq.ndim == 2 else inv_freq[None]                       # [B or 1, R/2]
    p = start[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)[None, :]  # [B, F]
    ang = p[:, :, None] * inv[:, None, :]                                           # [B, F, R/2]
    c, s = jnp.cos(ang).mean(1), jnp.sin(ang).mean(1)                             # [B, R/2]
    top = jnp.concatenate([jax.vmap(jnp.diag)(c), -jax.vmap(jnp.diag)(s)], axis=2)
    bottom = jnp.concatenate([jax.vmap(jnp.diag)(s), jax.vmap(jnp.diag)(c)], axis=2)
    rot = jnp.concatenate([top, bottom], axis=1)                                   # [B, R, R]
    R = rot.shape[-1]
    return rot if R == H else eye.at[:, :R, :R].set(rot)


@dataclass(frozen=True)
class ExpectedAttentionPress(ScorerPress):
    compression_ratio: float = 0.0
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        check_ratio(self.compression_ratio)
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be an int >= 1, got {self.n_future_positions!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")

    def check_lengths(self, n):
        if (np.asarray(n) <= self.n_sink).any():
            raise ValueError(f"ExpectedAttentionPress(n_sink={self.n_sink}) needs every row longer "
                             f"than n_sink; got a row of {int(np.min(n))} tokens")

    def score(self, inp: LayerInputs):
        B, T, N, H = inp.q.shape
        K = inp.k.shape[2]
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        stats = (t >= self.n_sink) & inp.valid                                     # [B, T]
        w = stats[:, :, None, None].astype(jnp.float32)
        count = jnp.maximum(stats.sum(1).astype(jnp.float32), 1.0)[:, None, None]   # [B, 1, 1]
        q = inp.q.astype(jnp.float32)
        mu = (q * w).sum(1) / count                                                 # [B, N, H]
        centered = (q - mu[:, None]) * w
        cov = jnp.einsum("btnh,btni->bnhi", centered, centered) / count[..., None]
        R = averaged_rotation(inp.lengths, self.n_future_positions, inp.inv_freq, H)   # [B, H, H]
        mu = jnp.einsum("bij,bnj->bni", R, mu)
        cov = jnp.einsum("bij,bnjk,blk->bnil", R, cov, R)
        keys = inp.k.astype(jnp.float32)                                           # [B, T, K, H]
        kq = jnp.repeat(keys, N // K, axis=2)                                        # [B, T, N, H]
        logits = jnp.einsum("btnh,bnh->bnt", kq, mu) / np.sqrt(H)
        if self.use_covariance:
            logits = logits + jnp.einsum("btni,bnij,btnj->bnt", kq, cov, kq) / H / 2
        logits = jnp.where(stats[:, None, :], logits, -jnp.inf)
        scores = group_mean(jax.nn.softmax(logits, axis=-1), K)                     # [B, K, T]
        if self.use_vnorm:
            vnorm = jnp.linalg.norm(inp.v.astype(jnp.float32), axis=-1)             # [B, T, K]
            scores = (scores + self.epsilon) * jnp.swapaxes(vnorm, 1, 2)
        return always_keep(scores, (t < self.n_sink) & inp.valid)
