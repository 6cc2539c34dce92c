"""Token sampling as pure functions of (logits, key, traced parameters).

Axis letters: B batch, V vocab. Every parameter is an array (per row, shape [B]), so
changing a temperature or top-p inside a jitted loop never recompiles.

Order follows Hugging Face's warpers: temperature, then top-k, then top-p, then a
categorical draw. Temperature 0 means greedy for that row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> int32 [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    logits: float [B, V]; top_k: int [B] (<= 0 disables); top_p: float [B] (>= 1 disables).
    top-p keeps the smallest set of most likely tokens whose probability mass (after top-k)
    is >= p. Ties at the threshold logit are kept together.
    """
    V = logits.shape[-1]
    order = jnp.sort(logits, axis=-1)[:, ::-1]                           # [B, V] descending
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]                       # [1, V]
    in_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])               # [B, V]
    kept = jnp.where(in_k, order, _NEG_INF)
    probs = jax.nn.softmax(kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(keep.sum(-1), 1)                                # the top token always stays
    threshold = jnp.take_along_axis(order, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(logits >= threshold, logits, _NEG_INF)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Draw one token per row. logits [B, V]; parameters [B] -> int32 [B].

    Rows with temperature 0 take the argmax. When every row is greedy the sort and the
    draw are skipped at run time (`lax.cond`), so greedy decoding pays nothing for them.
    """
    logits = logits.astype(jnp.float32)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = filter_logits(logits / t, top_k, top_p)
        drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy(logits))

    return jax.lax.cond(jnp.all(temperature <= 0), greedy, draw, logits)
