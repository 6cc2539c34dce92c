"""Pressed and pooled layouts: per-kv-head slot positions after a press has compacted a chunk.

Axis letters: B batch, K kv heads, S slots per head, P pool slots (K * S), T chunk, H head dim.

A pressed cache keeps, per layer, `head_pos` [B, K, S_l] (position held by each slot, -1
empty; kept slots packed at the front in position order) and `head_fill` [B, K]. A pooled
cache (AdaKV) holds the K heads' slots of a layer as one pool [B, 1, P, H] with
`head_owner` [B, P] naming the kv head of each slot.

A hybrid cache (rings on its windowed layers) is pressed on its full layers only: a ring
already holds just the window its layer reads, and keeps every token of it. Its ring layers
carry placeholders (`head_pos` [B, K, 0], `head_fill` [B, K] zeros) and are read and written
as rings (dense.attend_blocks); `assemble_chunk` updates both kinds of layer and the rings'
`slot_pos`. Pooled (AdaKV) caches are never hybrid.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..attention_math import attention_mask, softmax_blocks
from .core import KVCache
from .dense import layer_arrays, read_layer, slot_positions, stored


@dataclass(frozen=True)
class Keep:
    """A press's decision for one layer's chunk: the write instruction of this layout."""
    mask: jax.Array                 # bool [B, K, T]: token t is kept by kv head k
    keys: jax.Array | None = None   # [B, T, K, H] keys to store instead of the chunk's (re-rotated)
    positions: jax.Array | None = None   # int32 [B, K, T] position each kept token takes
    next_position: jax.Array | None = None   # int32 [B] position of the next token after the chunk


def keep_all(k, lengths) -> Keep:
    """Keep every real token of a chunk (k [B, T, K, H], lengths [B]): no press."""
    B, T, K = k.shape[:3]
    valid = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    return Keep(jnp.broadcast_to(valid[:, None, :], (B, K, T)))


def as_pressed(cache: KVCache) -> KVCache:
    """A dense/int8 cache in the pressed layout (traced): slot s of every head holds position s."""
    if cache.pressed:
        return cache
    if cache.all_rings:   # host checks refuse this first (kvjax/press/host.py)
        raise ValueError("a cache with rings on every layer has no full layer to press")
    pos, fill = [], []
    for layer in range(len(cache.keys)):
        B, K, S = cache.keys[layer].shape[:3]
        if cache.ring_layer(layer):       # a ring keeps its window: placeholders only
            pos.append(jnp.full((B, K, 0), -1, jnp.int32))
            fill.append(jnp.zeros((B, K), jnp.int32))
            continue
        s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        used = cache.lengths[:, None, None]
        pos.append(jnp.where(s < used, s, -1) * jnp.ones((B, K, 1), jnp.int32))
        fill.append(jnp.broadcast_to(jnp.minimum(cache.lengths, S)[:, None], (B, K)).astype(jnp.int32))
    return cache.replace(head_pos=tuple(pos), head_fill=tuple(fill))


def as_pooled(cache: KVCache) -> KVCache:
    """An EMPTY dense/int8 cache as one pool of K * S slots per layer (traced; a reshape)."""
    if cache.pooled:
        return cache
    if cache.hybrid:      # host checks refuse this first (kvjax/press/host.py)
        raise ValueError("AdaKVPress's pooled layout is not made on hybrid caches")
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
    # Made inside a program, the empty pool's positions and owners (-1) are constants: XLA would
    # know every slot is masked and constant-fold the pool's masked [B, K, G, T, P] scores and
    # their reduce_max in every layer (minutes per compile on a 30-layer model; issue 21 part 5).
    pos, owner = jax.lax.optimization_barrier((tuple(pos), tuple(owner)))
    return cache.replace(keys=tuple(keys), values=tuple(values), key_scales=tuple(ks),
                         value_scales=tuple(vs), head_pos=pos, head_owner=owner,
                         head_fill=tuple(fill))


def _scatter_heads(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] <- new [B, T, K, ...] at per-head slots [B, K, T] (slot S is dropped)."""
    def one(b, n, sl):  # [S, ...], [T, ...], [T]
        return b.at[sl].set(n.astype(b.dtype), mode="drop")

    per_head = jax.vmap(one, in_axes=(0, 1, 0))           # over K: new is [T, K, ...]
    return jax.vmap(per_head)(buf, new, slots)


def write_layer_heads(cache: KVCache, layer: int, k_new, v_new, slots) -> dict:
    """One layer's arrays after writing k/v [B, T, K, H] at per-head `slots` [B, K, T]."""
    new = stored(cache.kind, k_new, v_new)
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


def assemble_chunk(cache: KVCache, layers: list, starts, lengths, slots) -> KVCache:
    """The pressed cache after a chunk: every layer's new arrays; `lengths` the next position
    (a press may move it: KeyRerotation). A hybrid cache's ring layers keep their placeholders
    and its rings' `slot_pos` takes the chunk at `slots[1]` (dense.chunk_slots' ring slots)."""
    nxt = next((l["next"] for l in layers if "next" in l), starts + lengths)
    pos = [l.get("pos", cache.head_pos[i]) for i, l in enumerate(layers)]
    fill = [l.get("fill", cache.head_fill[i]) for i, l in enumerate(layers)]
    new = assemble_pressed(cache, layers, pos, fill, nxt)
    if cache.hybrid:
        new = new.replace(slot_pos=slot_positions(cache.ring_view(), starts, lengths, slots[1])[0])
    return new


# ----------------------------------------------------------------------------- appending a chunk

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


# ----------------------------------------------------------------------------- attention

def attend(chunk, cache: KVCache, write):
    """(out [B, T, N, H], new arrays) of one layer over a pressed cache, appending the chunk's
    kept tokens. One token without a press: write, then read in place. Otherwise the chunk
    attends over the old cache plus all of its own tokens, then its kept tokens are written
    (a press sees the whole chunk first, as in kvpress)."""
    layer, k, v, q = chunk.layer, chunk.k, chunk.v, chunk.q
    if write.press is None and k.shape[1] == 1:
        new_layer = write_chunk(cache, layer, k, v, chunk.positions, keep_all(k, chunk.lengths))
        kb, vb = read_layer(cache.kind, new_layer, k.dtype)
        block = _cache_block(chunk, kb, vb, new_layer["pos"], new_layer.get("owner"))
        return softmax_blocks([block], q.dtype), new_layer
    kb, vb = read_layer(cache.kind, layer_arrays(cache, layer), k.dtype)
    owner = cache.head_owner[layer] if cache.pooled else None
    own_k, own_v, _, valid = chunk.own_block()
    blocks = [_cache_block(chunk, kb, vb, cache.head_pos[layer], owner),
              (chunk.plain_score(q, own_k),
               attention_mask(chunk.positions, chunk.positions, valid, chunk.window, chunk.sinks), own_v)]
    need_sums = write.press is not None and write.press.needs_attention
    res = softmax_blocks(blocks, q.dtype, column_sums=need_sums, query_valid=valid)
    out, sums = res if need_sums else (res, None)
    keep = keep_all(k, chunk.lengths) if write.press is None else chunk.press_keep(sums[1] if need_sums else None)
    return out, write_chunk(cache, layer, k, v, chunk.positions, keep)


def _cache_block(chunk, kb, vb, pos, owner):
    """(scores, mask, values) of a pressed cache's slots. Per-head slots: pos [B, K, S]. A pool
    (owner [B, P]): keys [B, 1, P, H] scored once by every query head, each slot masked to
    its owner's query heads."""
    q = chunk.q
    mask = attention_mask(chunk.positions, pos, pos >= 0, chunk.window, chunk.sinks)   # [B, K or 1, T, S]
    if owner is None:
        return chunk.plain_score(q, kb), mask, vb
    B, T, N, _ = q.shape
    K = chunk.k.shape[2]
    s = chunk.plain_score(q, kb).reshape(B, K, N // K, T, -1)                          # [B, K, G, T, P]
    own = owner[:, None, :] == jnp.arange(K, dtype=jnp.int32)[None, :, None]            # [B, K, P]
    mask = mask[:, :, None] & own[:, :, None, None, :]                                  # [B, K, 1, T, P]
    return s, mask, jnp.broadcast_to(vb, (B, K, *vb.shape[2:]))
