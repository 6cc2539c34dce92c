"""The decoder: Flax linen modules applied functionally.

Axis letters: B batch, T sequence (chunk), D model, V vocab, L layers.

Params are a plain pytree (`init_params`); the cache is an explicit argument (a KVCache)
and the new per-layer cache arrays are an explicit return value, never a mutable Flax
collection. One forward path serves a full no-cache pass, chunked prefill and
single-token decode: they differ only in whether `cache` is given and in the chunk length T.

Parameter tree (names used by the checkpoint mapping in kvjax/hf/):
  embed/embedding [V, D]; pos_embed/embedding [P, D] (learned positions only)
  layers_{i}/attn/{q,k,v,o}/{kernel [in, out], bias?}, attn/{q_norm,k_norm}/scale (qk_norm),
             mlp/{gate,up,down} (swiglu, geglu) or mlp/{fc,proj} (gelu), and per
             norm_placement: "pre" attn_norm, mlp_norm; "sandwich" (Gemma 2/3) those plus
             post_attn_norm, post_mlp_norm; "post" (OLMo 2) post_attn_norm, post_mlp_norm only
  final_norm/{scale, bias?}; lm_head/kernel [D, V] (untied only)

Per layer: `cfg.layer_window(i)` and `cfg.layer_rope(i)` pick each layer's window and
rotary table (attention.py); everything else is shared by every layer.
"""
from __future__ import annotations

import math
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import Attention
from .config import ModelConfig
from .layers import MLP, Norm


class Block(nn.Module):
    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x, positions, lengths, cache=None, layer=0, write=None):
        c = self.cfg
        pre = c.norm_placement in ("pre", "sandwich")     # norm the sublayer's input
        post = c.norm_placement in ("sandwich", "post")   # norm its output before the residual add
        h, new_layer = Attention(c, self.std, name="attn")(
            Norm(c, name="attn_norm")(x) if pre else x, positions, lengths, cache, layer, write)
        x = x + (Norm(c, name="post_attn_norm")(h) if post else h)
        h = MLP(c, self.std, name="mlp")(Norm(c, name="mlp_norm")(x) if pre else x)
        x = x + (Norm(c, name="post_mlp_norm")(h) if post else h)
        return x, new_layer


class Transformer(nn.Module):
    cfg: ModelConfig
    std: float = 0.02  # init scale only

    @nn.compact
    def __call__(self, tokens, positions, lengths, cache=None, write=None, logits_at=None):
        """tokens, positions: int32 [B, T]; lengths: int32 [B] real tokens per row.

        cache: None or the KVCache before this chunk; write: a kvjax.cache.attend.CacheWrite,
        what every layer's cache write needs (the chunk's first position per row, where each
        token goes, the live prefix to read, a press and its budgets).
        logits_at: None for logits at every position [B, T, V], or int32 [B] to compute
        them only at one position per row [B, 1, V] (prefill and decode need no more).
        Returns (logits, list of L per-layer new cache arrays, or None).
        """
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=dt, name="embed",
                         embedding_init=nn.initializers.normal(self.std))
        # Only padding can fall outside the vocab (real tokens are validated on the host);
        # clip so padding such as -1 never indexes anything surprising.
        x = embed(jnp.clip(tokens, 0, c.vocab_size - 1))                        # [B, T, D]
        if c.embed_scale:  # Gemma: sqrt(d_model) rounded to the weight dtype, as transformers
            x = x * jnp.asarray(math.sqrt(c.d_model), jnp.float32).astype(dt)
        if c.positions == "learned":
            pos_embed = nn.Embed(c.max_position, c.d_model, dtype=dt, param_dtype=dt,
                                 name="pos_embed", embedding_init=nn.initializers.normal(self.std))
            x = x + pos_embed(jnp.clip(positions, 0, c.max_position - 1))
        new_layers = []
        for i in range(c.num_layers):  # unrolled: each layer updates its own cache buffer
            x, new_layer = Block(c, self.std, name=f"layers_{i}")(x, positions, lengths, cache, i, write)
            new_layers.append(new_layer)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)       # [B, 1, D]
        x = Norm(c, name="final_norm")(x)
        if c.tie_embeddings:
            logits = tied_logits(x, embed.embedding.astype(dt))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, param_dtype=dt,
                              name="lm_head", kernel_init=nn.initializers.normal(self.std))(x)
        logits = logits.astype(jnp.float32)
        if c.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            logits = c.final_softcap * jnp.tanh(logits / c.final_softcap)
        return logits, (None if cache is None else new_layers)


def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [B, T, D] times the tied embedding [V, D] -> [B, T, V] (flax's `Embed.attend`), with
    the table as the dot's first operand in its stored layout. `x @ embedding.T` made XLA's
    CPU backend copy the whole table into [D, V] inside every decode step (113 MB read and
    written per step for SmolLM2, 671 MB for Gemma 3) before reading it again for the dot."""
    out = jax.lax.dot_general(embedding, x, (((1,), (2,)), ((), ())))            # [V, B, T]
    return jnp.transpose(out, (1, 2, 0))


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02):
    """Random parameters (normal(std) weights, unit norms) as a plain nested dict.

    Initialised under jit so full-size shapes are created directly in `cfg.dtype`.
    """
    return _jitted_init(cfg, std)(key)


@lru_cache(maxsize=None)
def _jitted_init(cfg: ModelConfig, std: float):
    """One compiled initialiser per (config, std): repeated init_params calls do not recompile."""
    model = Transformer(cfg, std)

    def init(key):
        # Dummy inputs are made inside the traced function: a builder called under another
        # trace (e.g. jax.eval_shape) must not cache that trace's values in its closure.
        tokens = jnp.zeros((1, 1), jnp.int32)
        return model.init(key, tokens, tokens, jnp.ones((1,), jnp.int32))["params"]

    return jax.jit(init)


def param_bytes(params) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
