"""Building blocks shared by every family: norms, rotary positions, MLPs.

Axis letters: B batch, T sequence (chunk), D model, N heads, H head dim, F mlp.
Norms and rotary run in float32 whatever the parameter dtype, as Hugging Face does,
so bf16 models lose no precision in the reductions.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig


def dense(cfg: ModelConfig, features: int, name: str, bias: bool, std: float) -> nn.Dense:
    """A Dense layer in the model dtype with a kernel of shape [in, out]."""
    dt = jnp.dtype(cfg.dtype)
    return nn.Dense(features, use_bias=bias, dtype=dt, param_dtype=dt, name=name,
                    kernel_init=nn.initializers.normal(std))


class Norm(nn.Module):
    """RMSNorm (Llama family) or LayerNorm with bias (GPT-2), computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        dt = jnp.dtype(self.cfg.dtype)
        feature = (1,) * (x.ndim - 1) + (x.shape[-1],)  # explicit rank: no implicit broadcasting
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), dt).reshape(feature)
        h = x.astype(jnp.float32)
        if self.cfg.norm == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), dt).reshape(feature)
            h = h - h.mean(-1, keepdims=True)
            h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.cfg.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.cfg.norm_eps)
        # Hugging Face casts back to the activation dtype before multiplying by the weight.
        return scale * h.astype(dt)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2] for rotary positions, with Llama-3 scaling when configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
    # between is interpolated smoothly (same formula as transformers' `_compute_llama3_parameters`).
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array):
    """cos, sin of positions [B, X] times inv_freq: each float32 [B, X, H/2]."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotary (`rotate_half`, as in HF) of x [..., H] by cos/sin [..., H/2] of x's rank."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] (sequence second) by positions [B, T]."""
    cos, sin = rope_tables(positions, inv_freq)
    return rotate(x, cos[:, :, None, :], sin[:, :, None, :])


def apply_rope_heads_first(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate cache-layout keys x [B, K, S, H] by positions [B, S]."""
    cos, sin = rope_tables(positions, inv_freq)
    return rotate(x, cos[:, None, :, :], sin[:, None, :, :])


class MLP(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)) or GPT-2's GELU MLP (proj(gelu(fc x)))."""

    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.cfg
        if c.mlp == "swiglu":
            gate = dense(c, c.mlp_dim, "gate", False, self.std)(x)
            up = dense(c, c.mlp_dim, "up", False, self.std)(x)
            return dense(c, c.d_model, "down", False, self.std)(nn.silu(gate) * up)
        h = nn.gelu(dense(c, c.mlp_dim, "fc", c.out_bias, self.std)(x), approximate=True)
        return dense(c, c.d_model, "proj", c.out_bias, self.std)(h)
