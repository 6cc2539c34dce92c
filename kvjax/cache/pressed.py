"""Pressed and pooled layouts: per-kv-head slot positions after a press has compacted a chunk.

Axis letters: B batch, K kv heads, S slots per head, P pool slots (K * S), T chunk, H head dim.

A pressed cache keeps, per layer, `head_pos` [B, K, S_l] (position held by each slot, -1
empty; kept slots packed at the front in position order) and `head_fill` [B, K]. A pooled
cache (AdaKV) holds the K heads' slots of a layer as one pool [B, 1, P, H] with
`head_owner` [B, P] naming the kv head of each slot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .core import KVCache
from .dense import layer_arrays, quantize_int8


def as_pressed(cache: KVCache) -> KVCache:
    """A dense/int8 cache in the pressed layout (traced): slot s of every head holds position s."""
    if cache.pressed:
        return cache
    if cache.hybrid:   # host checks refuse this first (kvjax/press/host.py)
        raise ValueError("a hybrid cache cannot be pressed; make it with init_cache(..., hybrid=False)")
    pos, fill = [], []
    for layer in range(len(cache.keys)):
        B, K, S = cache.keys[layer].shape[:3]
        s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        used = cache.lengths[:, None, None]
        pos.append(jnp.where(s < used, s, -1) * jnp.ones((B, K, 1), jnp.int32))
        fill.append(jnp.broadcast_to(jnp.minimum(cache.lengths, S)[:, None], (B, K)).astype(jnp.int32))
    return cache.replace(head_pos=tuple(pos), head_fill=tuple(fill))


def as_pooled(cache: KVCache) -> KVCache:
    """An EMPTY dense/int8 cache as one pool of K * S slots per layer (traced; a reshape)."""
    if cache.pooled:
        return cache
    keys, values, ks, vs, pos, owner, fill = [], [], [], [], [], [], []
    for layer in range(len(cache.keys)):
        B, K, S, H = cache.keys[layer].shape
        keys.append(cache.keys[layer].reshape(B, 1, K * S, H))
        values.append(cache.values[layer].reshape(B, 1, K * S, H))
        if cache.kind == "int8":
            ks.append(cache.key_scales[layer].reshape(B, 1, K * S))
            vs.append(cache.value_scales[layer].reshape(B, 1, K * S))
        pos.append(jnp.full((B, 1, K * S), -1, jnp.int32))
        owner.append(jnp.full((B, K * S), -1, jnp.int32))
        fill.append(jnp.zeros((B, K), jnp.int32))          # per head; the pool's fill is the sum
    return cache.replace(keys=tuple(keys), values=tuple(values), key_scales=tuple(ks),
                         value_scales=tuple(vs), head_pos=tuple(pos), head_owner=tuple(owner),
                         head_fill=tuple(fill))


def _scatter_heads(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] <- new [B, T, K, ...] at per-head slots [B, K, T] (slot S is dropped)."""
    def one(b, n, sl):  # [S, ...], [T, ...], [T]
        return b.at[sl].set(n.astype(b.dtype), mode="drop")

    per_head = jax.vmap(one, in_axes=(0, 1, 0))           # over K: new is [T, K, ...]
    return jax.vmap(per_head)(buf, new, slots)


def write_layer_heads(cache: KVCache, layer: int, k_new, v_new, slots) -> dict:
    """One layer's arrays after writing k/v [B, T, K, H] at per-head `slots` [B, K, T]."""
    if cache.kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
        new = {"k": kq, "v": vq, "ks": ks, "vs": vs}
    else:
        new = {"k": k_new, "v": v_new}
    return {name: _scatter_heads(old, new[name], slots) for name, old in layer_arrays(cache, layer).items()}


def gather_layer_heads(cache: KVCache, layer: int, order) -> dict:
    """One layer's arrays reordered per head: slot j of head (b, k) takes old slot order[b, k, j]."""
    def take(a):
        idx = order if a.ndim == 3 else order[..., None]
        return jnp.take_along_axis(a, idx, axis=2)
    return {name: take(a) for name, a in layer_arrays(cache, layer).items()}


def assemble_pressed(cache: KVCache, layers: list, head_pos: list, head_fill: list, lengths) -> KVCache:
    """The pressed cache made of new per-layer arrays, per-head positions and fills."""
    changes = dict(keys=tuple(l["k"] for l in layers), values=tuple(l["v"] for l in layers),
                   lengths=lengths, head_pos=tuple(head_pos), head_fill=tuple(head_fill))
    if cache.pooled:
        changes["head_owner"] = tuple(l["owner"] for l in layers)
    if cache.kind == "int8":
        changes.update(key_scales=tuple(l["ks"] for l in layers),
                       value_scales=tuple(l["vs"] for l in layers))
    return cache.replace(**changes)
