"""Attention: one module for full-sequence, chunked prefill and single-token decode.

Axis letters: B batch, T query chunk, S key slots, D model, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim.

Without a cache the keys are the chunk's own; with a cache the chunk's K/V are first
written at each row's current length and the queries attend over the whole buffer.
Either way the same mask rule applies: a key is visible when it is valid, not in the
future (k_pos <= q_pos), and, for sliding-window models, q_pos - k_pos < window.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .cache import write_chunk
from .config import ModelConfig
from .layers import apply_rope, dense, rope_inv_freq

_NEG = jnp.finfo(jnp.float32).min  # finite, so a fully masked padding row never makes NaN


def attention_mask(q_pos, k_pos, k_valid, window):
    """Visibility [B, T, S] from q_pos [B, T], k_pos [B, S], k_valid [B, S]."""
    mask = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        mask = mask & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    return mask


def dot_attention(q, k, v, mask):
    """Reference grouped-query attention; the oracle for any faster kernel.

    q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] -> [B, T, N, H].
    Scores and softmax run in float32.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x, positions, lengths, kv=None, starts=None):
        """x: [B, T, D]; positions: int32 [B, T]; lengths: int32 [B] real tokens of the chunk.

        kv: None (no cache) or (k_buf, v_buf), each [B, K, S, H]; starts: int32 [B], the
        slot where this chunk begins in each row. Returns ([B, T, D], new kv or None).
        """
        c = self.cfg
        B, T, _ = x.shape
        q = dense(c, c.num_heads * c.head_dim, "q", c.qkv_bias, self.std)(x)
        k = dense(c, c.num_kv_heads * c.head_dim, "k", c.qkv_bias, self.std)(x)
        v = dense(c, c.num_kv_heads * c.head_dim, "v", c.qkv_bias, self.std)(x)
        q = q.reshape(B, T, c.num_heads, c.head_dim)
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        if c.positions == "rotary":
            inv_freq = rope_inv_freq(c)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)  # keys are cached after rotation

        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        if kv is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
            k_pos, k_valid, new_kv = positions, t < lengths[:, None], None
        else:
            keys = write_chunk(kv[0], k, starts, lengths)
            values = write_chunk(kv[1], v, starts, lengths)
            S = keys.shape[2]
            k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
            k_valid = k_pos < (starts + lengths)[:, None]
            new_kv = (keys, values)
        mask = attention_mask(positions, k_pos, k_valid, c.sliding_window)
        out = dot_attention(q, keys, values, mask).reshape(B, T, c.num_heads * c.head_dim)
        return dense(c, c.d_model, "o", c.out_bias, self.std)(out), new_kv
