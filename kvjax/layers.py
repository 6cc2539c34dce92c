"""Building blocks shared by every family: norms, rotary positions, MLPs.

Axis letters: B batch, T sequence (chunk), D model, N heads, H head dim, R rotated dims
(H, or `rotary_dim` with partial rotary), F mlp.
Norms and rotary run in float32 whatever the parameter dtype, as Hugging Face does,
so bf16 models lose no precision in the reductions.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig, RopeScaling


def dense(cfg: ModelConfig, features: int, name: str, bias: bool, std: float) -> nn.Dense:
    """A Dense layer in the model dtype with a kernel of shape [in, out]."""
    dt = jnp.dtype(cfg.dtype)
    return nn.Dense(features, use_bias=bias, dtype=dt, param_dtype=dt, name=name,
                    kernel_init=nn.initializers.normal(std))


class Norm(nn.Module):
    """Normalisation over the last axis, computed in float32 (`cfg.norm`):

    "rmsnorm" (Llama): w * rms(x), cast to the activation dtype before the multiply;
    "gemma_rmsnorm" (Gemma 1/2/3): rms(x) * (1 + w) in float32, then cast; the scale is
    stored as Hugging Face stores it (zero-centred, so it initialises to 0);
    "layernorm" (GPT-2): with bias.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., D]
        dt = jnp.dtype(self.cfg.dtype)
        feature = (1,) * (x.ndim - 1) + (x.shape[-1],)  # explicit rank: no implicit broadcasting
        gemma = self.cfg.norm == "gemma_rmsnorm"
        init = nn.initializers.zeros if gemma else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), dt).reshape(feature)
        h = x.astype(jnp.float32)
        if self.cfg.norm == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), dt).reshape(feature)
            h = h - h.mean(-1, keepdims=True)
            h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.cfg.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.cfg.norm_eps)
        if gemma:  # Gemma multiplies in float32 and casts last
            return (h * (1.0 + scale.astype(jnp.float32))).astype(dt)
        # Hugging Face's Llama casts back to the activation dtype before multiplying by the weight.
        return scale * h.astype(dt)


def rotary_dims(cfg: ModelConfig) -> int:
    """R: how many leading dims of each head rotary rotates (all of them unless partial)."""
    return cfg.rotary_dim or cfg.head_dim


def _base_inv_freq(theta: float, R: int, factors=None) -> jax.Array:
    """1 / (factors * theta ** (2i / R)), float32 [R/2], in transformers' order of operations."""
    exponent = jnp.arange(0, R, 2, dtype=jnp.float32) / R
    if factors is None:
        return 1.0 / (theta ** exponent)
    return 1.0 / (jnp.asarray(factors, jnp.float32) * theta ** exponent)


def rope_inv_freq(cfg: ModelConfig, layer: int = 0, long: bool = False) -> jax.Array:
    """Inverse frequencies [R/2] of `layer`'s rotary table (`cfg.layer_rope(layer)`).

    Scaling: "llama3" (frequency-dependent), "linear" (all divided by factor) or
    "longrope" (the short factors, or the long ones with `long=True`).
    """
    theta, rs = cfg.layer_rope(layer)
    R = rotary_dims(cfg)
    if rs is not None and rs.rope_type == "longrope":
        return _base_inv_freq(theta, R, rs.long_factor if long else rs.short_factor)
    inv = _base_inv_freq(theta, R)
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
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


def longrope_attention_factor(rs: RopeScaling) -> float:
    """The cos/sin multiplier of longrope: as given, else sqrt(1 + ln(factor) / ln(original))
    (1 when factor <= 1), as transformers' `_compute_longrope_parameters`."""
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rs.factor) / math.log(rs.original_max_position))


def chunk_rope(cfg: ModelConfig, layer: int, positions: jax.Array, lengths: jax.Array):
    """(inv_freq, scale) for `layer` on a chunk: inv_freq float32 [R/2], or [B, R/2] with
    longrope, where a row uses the long factors when its last real position in this chunk
    is >= original_max_position (transformers switches on max(position_ids) + 1 >
    original_max_position_embeddings for each forward call; per row here, so a row of a
    ragged batch equals that row run alone). Keys are cached after rotation, so tokens
    cached before the switch keep their short-factor rotation, as in transformers' cache.
    scale multiplies cos and sin (longrope's attention factor; 1 otherwise)."""
    _, rs = cfg.layer_rope(layer)
    if rs is None or rs.rope_type != "longrope":
        return rope_inv_freq(cfg, layer), 1.0
    T = positions.shape[1]
    real = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    last = jnp.max(jnp.where(real, positions, -1), axis=1)                      # [B]
    long = (last >= rs.original_max_position)[:, None]                           # [B, 1]
    inv = jnp.where(long, rope_inv_freq(cfg, layer, long=True)[None, :],
                    rope_inv_freq(cfg, layer)[None, :])                           # [B, R/2]
    return inv, longrope_attention_factor(rs)


def rope_tables(positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0):
    """cos, sin of positions [B, X] times inv_freq [R/2] (or per row [B, R/2]): each
    float32 [B, X, R/2], times `scale` (longrope's attention factor)."""
    inv = inv_freq[None, None, :] if inv_freq.ndim == 1 else inv_freq[:, None, :]
    angles = positions.astype(jnp.float32)[:, :, None] * inv
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotary (`rotate_half`, as in HF) of x [..., H] by cos/sin [..., R/2] of x's
    rank. With R < H (partial rotary, Phi-3) only the first R dims rotate; the rest pass."""
    R = 2 * cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :R // 2], xf[..., R // 2:R], xf[..., R:]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if R < x.shape[-1]:
        parts.append(rest)
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotate x [B, T, N, H] (sequence second) by positions [B, T]."""
    cos, sin = rope_tables(positions, inv_freq, scale)
    return rotate(x, cos[:, :, None, :], sin[:, :, None, :])


def apply_rope_heads_first(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                           scale: float = 1.0) -> jax.Array:
    """Rotate cache-layout keys x [B, K, S, H] by positions [B, S]."""
    cos, sin = rope_tables(positions, inv_freq, scale)
    return rotate(x, cos[:, None, :, :], sin[:, None, :, :])


class MLP(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)), GeGLU (Gemma: down(gelu_tanh(gate x) * up x)) or
    GPT-2's GELU MLP (proj(gelu(fc x)))."""

    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.cfg
        if c.mlp in ("swiglu", "geglu"):
            gate = dense(c, c.mlp_dim, "gate", False, self.std)(x)
            up = dense(c, c.mlp_dim, "up", False, self.std)(x)
            act = nn.silu(gate) if c.mlp == "swiglu" else nn.gelu(gate, approximate=True)
            return dense(c, c.d_model, "down", False, self.std)(act * up)
        h = nn.gelu(dense(c, c.mlp_dim, "fc", c.out_bias, self.std)(x), approximate=True)
        return dense(c, c.d_model, "proj", c.out_bias, self.std)(h)
