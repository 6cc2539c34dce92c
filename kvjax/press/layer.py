"""The one compaction: how a chunk's tokens enter a pressed cache, per layer and kv head.

Axis letters: B batch, T chunk tokens, K kv heads, S slots, H head dim.

Each (row, kv head) keeps its slots packed at the front: `head_fill[b, k]` slots are used,
and `head_pos` records the position each holds. A chunk's kept tokens (all of its real
tokens without a press; the press's choice with one) are appended after the used slots in
position order. The chunk itself attends over the old cache plus all of its own tokens
(kvpress presses a context after its prefill has seen all of it), so compaction never
changes the logits of the chunk that is being pressed, only what later tokens can see.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..cache import KVCache, write_layer_heads
from .base import Keep, LayerInputs


def chunk_keep(press, inp: LayerInputs) -> Keep:
    """The press's decision, or keep every real token without a press."""
    if press is None:
        B, T, K = inp.k.shape[:3]
        return Keep(jnp.broadcast_to(inp.valid[:, None, :], (B, K, T)))
    return press.keep(inp)


def write_chunk(cache: KVCache, layer: int, k, v, positions, keep: Keep) -> dict:
    """This layer's new arrays after appending the kept tokens: k, v (+ int8 scales), pos, fill.

    k, v: [B, T, K, H] (k as cached, after rotary); positions: int32 [B, T].
    """
    if cache.pooled:
        return _write_pool(cache, layer, k, v, positions, keep)
    fill = cache.head_fill[layer]                                              # [B, K]
    S = cache.layer_slots(layer)
    mask = keep.mask
    rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1                       # [B, K, T]
    slots = jnp.where(mask, fill[:, :, None] + rank, S)
    keys = k if keep.keys is None else keep.keys
    arrays = write_layer_heads(cache, layer, keys, v, slots)
    B, K, T = mask.shape
    pos = keep.positions if keep.positions is not None else jnp.broadcast_to(positions[:, None, :], (B, K, T))

    def one(hp, sl, p):                                                        # [S], [T], [T]
        return hp.at[sl].set(p, mode="drop")

    arrays["pos"] = jax.vmap(jax.vmap(one))(cache.head_pos[layer], slots, pos)
    arrays["fill"] = jnp.minimum(fill + mask.sum(-1, dtype=jnp.int32), S)
    if keep.next_position is not None:
        arrays["next"] = keep.next_position
    return arrays


def _write_pool(cache: KVCache, layer: int, k, v, positions, keep: Keep) -> dict:
    """Pooled layout: the kept (token, head) pairs in (position, head) order after the used slots,
    each slot tagged with its kv head."""
    B, K, T = keep.mask.shape
    H = k.shape[-1]
    P = cache.layer_slots(layer)
    fill = cache.head_fill[layer].sum(-1, dtype=jnp.int32)                     # [B] pool slots used
    flat = jnp.swapaxes(keep.mask, 1, 2).reshape(B, T * K)                     # (t, k) pairs
    rank = jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1
    slots = jnp.where(flat, fill[:, None] + rank, P)                           # [B, T*K]
    keys = k if keep.keys is None else keep.keys
    arrays = write_layer_heads(cache, layer, keys.reshape(B, T * K, 1, H), v.reshape(B, T * K, 1, H),
                               slots[:, None, :])
    pos = keep.positions if keep.positions is not None else jnp.broadcast_to(positions[:, None, :], (B, K, T))
    pos = jnp.swapaxes(pos, 1, 2).reshape(B, T * K)
    owner = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, None, :], (B, T, K)).reshape(B, T * K)
    put = jax.vmap(lambda a, sl, x: a.at[sl].set(x, mode="drop"))
    arrays["pos"] = put(cache.head_pos[layer][:, 0], slots, pos)[:, None, :]
    arrays["owner"] = put(cache.head_owner[layer], slots, owner)
    arrays["fill"] = cache.head_fill[layer] + keep.mask.sum(-1, dtype=jnp.int32)   # [B, K] per head
    if keep.next_position is not None:
        arrays["next"] = keep.next_position
    return arrays
