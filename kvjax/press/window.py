"""Presses that score keys by the attention of the chunk's own queries: SnapKV, PyramidKV, TOVA,
ObservedAttention (H2O).

Axis letters: B batch, T chunk tokens, W window queries, K kv heads, N query heads,
G = N / K, H head dim, L layers.

The window is per row: the last `window_size` real tokens of each row of a ragged chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .base import LayerInputs, ScorerPress, always_keep, check_ratio, group_mean


def window_attention(inp: LayerInputs, w: int) -> jax.Array:
    """Softmax attention of each row's last `w` queries over all its keys, float32 [B, N, W, T].

    Causal inside the window (query i of row b sits at t = n_b - w + i), softmax over every
    real key, as kvpress's `compute_window_attention`.
    """
    B, T, N, H = inp.q_rot.shape
    K = inp.k.shape[2]
    n = inp.lengths
    t_q = n[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]               # [B, W]
    q = jnp.take_along_axis(inp.q_rot, jnp.clip(t_q, 0, T - 1)[:, :, None, None], axis=1)  # [B, W, N, H]
    qg = q.reshape(B, w, K, N // K, H).astype(jnp.float32)
    logits = jnp.einsum("bwkgh,btkh->bkgwt", qg, inp.k.astype(jnp.float32)) * (H ** -0.5)
    t_k = jnp.arange(T, dtype=jnp.int32)[None, None, :]
    mask = (t_k <= t_q[:, :, None]) & (t_k < n[:, None, None])                     # [B, W, T]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).reshape(B, N, w, T)


def avg_pool(x: jax.Array, kernel: int) -> jax.Array:
    """torch's avg_pool1d(stride 1, zero padding kernel // 2, count_include_pad) over the last axis."""
    pad = kernel // 2
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    T = x.shape[-1]
    return sum(xp[..., i:i + T] for i in range(kernel)) / kernel


def snapkv_scores(inp: LayerInputs, window_size: int, kernel_size: int) -> jax.Array:
    K = inp.k.shape[2]
    T = inp.k.shape[1]
    attn = window_attention(inp, window_size)                                     # [B, N, W, T]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    outside = t < (inp.lengths[:, None] - window_size)                           # [B, T] before the window
    scores = jnp.where(outside[:, None, :], attn.mean(axis=2), 0.0)               # [B, N, T]
    scores = group_mean(avg_pool(scores, kernel_size), K)
    in_window = (~outside) & inp.valid
    return always_keep(scores, in_window)


def _check_window(name, window_size, kernel_size):
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"{name}: window_size must be an int >= 1, got {window_size!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be an odd int >= 1 (kvpress's pooling needs an odd "
                         f"kernel), got {kernel_size!r}")


@dataclass(frozen=True)
class SnapKVPress(ScorerPress):
    """Keys the last `window_size` queries attend to, pooled over `kernel_size` neighbours
    (Li et al. 2024); the window itself is always kept."""
    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    needs_rotary = False

    def __post_init__(self):
        check_ratio(self.compression_ratio)
        _check_window(type(self).__name__, self.window_size, self.kernel_size)

    def check_lengths(self, n):
        if (np.asarray(n) <= self.window_size).any():
            raise ValueError(f"{type(self).__name__}(window_size={self.window_size}) needs every row "
                             f"longer than the window; got a row of {int(np.min(n))} tokens")

    def score(self, inp: LayerInputs):
        return snapkv_scores(inp, self.window_size, self.kernel_size)


@dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with budgets that shrink linearly from the first layer to the last
    (Cai et al. 2024); where the pyramid does not fit, every layer gets the SnapKV budget."""
    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    beta: int = 20

    def host_budgets(self, n, cfg):
        L = cfg.num_layers
        out = np.empty((L, len(n)), np.int32)
        for b, q_len in enumerate(np.asarray(n).tolist()):
            for layer in range(L):
                out[layer, b] = pyramid_budget(q_len, self.compression_ratio, self.window_size,
                                               self.beta, layer, L)
        return {"n_kept": out}


def pyramid_budget(q_len: int, ratio: float, window: int, beta: float, layer: int, num_layers: int) -> int:
    """kvpress 0.5.5's PyramidKVPress.get_layer_budget (Python floats and round(), as there)."""
    max_capacity_prompt = window + q_len * (1 - ratio)
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (q_len >= max_num >= min_num >= window):
        return max(1, round(q_len * (1 - ratio)))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer * steps)


@dataclass(frozen=True)
class TOVAPress(ScorerPress):
    """The last token's attention, averaged over all query heads, the same for every kv head
    (Oren et al. 2024); the last token is always kept."""
    compression_ratio: float = 0.0

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    def score(self, inp: LayerInputs):
        B, T, K = inp.k.shape[:3]
        attn = window_attention(inp, 1)[:, :, 0]                                   # [B, N, T]
        last = jnp.arange(T)[None, :] == (inp.lengths - 1)[:, None]
        scores = jnp.where(last[:, None, :], 0.0, attn).mean(axis=1, keepdims=True)
        return always_keep(jnp.broadcast_to(scores, (B, K, T)), last)


@dataclass(frozen=True)
class ObservedAttentionPress(ScorerPress):
    """H2O's observed attention: the attention each key received in the prefill, divided by
    the number of queries that could see it, averaged over the group."""
    compression_ratio: float = 0.0
    needs_attention = True

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    def score(self, inp: LayerInputs):
        T, K = inp.k.shape[1:3]
        seen_by = (inp.lengths[:, None] - jnp.arange(T)[None, :]).astype(jnp.float32)   # n - j
        return group_mean(inp.attn_sums / jnp.maximum(seen_by, 1.0)[:, None, :], K)
