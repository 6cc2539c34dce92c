"""Dense, int8 and ring layouts: where a chunk's tokens go, how a layer is written and read.

Axis letters: B batch, K kv heads, S cache slots, H head dim, T chunk length.

A dense/int8 cache holds position s in slot s; a ring (window and sinks kinds, and the
ring layers of a hybrid cache) holds position p in slot p mod S (after the sinks) and
records the position of every slot in `slot_pos`. `chunk_slots` says where each token of a
chunk goes, `write_layer` scatters a chunk's k/v there, `read_layer` hands attention the
(dequantised) buffers, and `assemble` builds the cache after the chunk. `attend_flash` is the
read of a multi-token chunk on a full (non-ring) dense/int8 layer when the caller asks for it
(`CacheWrite.flash`): key blocks in a loop with a traced trip count, online softmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..attention_math import attention_mask, fold_scale, group_mask, group_queries, grouped_scores, softmax_loop, ungroup
from .core import KVCache


def chunk_slots(cache: KVCache, starts: jax.Array, lengths: jax.Array, T: int) -> jax.Array:
    """Slot for each token of a right-padded chunk [B, T] appended at `starts`; S = not written.

    Padding is never written. In a ring, a chunk longer than the ring would hit a slot more
    than once (a scatter with duplicate indices has no defined winner), so only the last
    ring-size real tokens of the chunk are written: the earlier ones would be overwritten anyway.
    A hybrid cache gets a pair (slots of its full layers, slots of its ring layers); a pressed
    hybrid cache's full layers place their tokens themselves (None).
    """
    if cache.hybrid:
        full = next((i for i, r in enumerate(cache.rings) if not r), None)
        return (None if full is None or cache.pressed else chunk_slots(cache.layer_view(full), starts, lengths, T),
                chunk_slots(cache.ring_view(), starts, lengths, T))
    S, s = cache.max_len, cache.num_sinks
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = starts[:, None] + t                                           # [B, T]
    end = (starts + lengths)[:, None]
    keep = t < lengths[:, None]
    if cache.kind == "window" or (cache.slot_pos is not None and cache.kind != "sinks"):
        slot = pos % S
        keep = keep & (pos >= end - S)
    elif cache.kind == "sinks":
        ring = S - s
        slot = jnp.where(pos < s, pos, s + (pos - s) % ring)
        keep = keep & ((pos < s) | (pos >= end - ring))
    else:
        slot = pos
    return jnp.where(keep, slot, S)


def scatter_rows(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] <- new [B, T, K, ...] at slots [B, T] (slot S is dropped).

    vmap over rows (rather than one scatter indexed by (row, slot)) makes the batch a
    batching dimension of the scatter, so a batch-sharded cache updates shard-locally.
    """
    def row(b, n, sl):  # [K, S, ...], [T, K, ...], [T]
        return b.at[:, sl].set(jnp.swapaxes(n, 0, 1).astype(b.dtype), mode="drop")

    return jax.vmap(row)(buf, new, slots)


def quantize_int8(x: jax.Array):
    """Absmax int8 over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def layer_arrays(cache: KVCache, layer: int) -> dict:
    """One layer's stored arrays: k, v (and int8 scales ks, vs); kivi: kvjax.kivi's names."""
    if cache.kind == "kivi":
        return {"k_codes": cache.keys[layer], "v_codes": cache.values[layer], **cache.extras[layer]}
    arrays = {"k": cache.keys[layer], "v": cache.values[layer]}
    if cache.kind == "int8":
        arrays.update(ks=cache.key_scales[layer], vs=cache.value_scales[layer])
    return arrays


def read_layer(kind: str, arrays: dict, dtype):
    """(keys, values) [B, K, S, H] in `dtype` from one layer's arrays (int8 is dequantised here)."""
    k, v = arrays["k"], arrays["v"]
    if kind == "int8":
        k = (k.astype(jnp.float32) * arrays["ks"][..., None]).astype(dtype)
        v = (v.astype(jnp.float32) * arrays["vs"][..., None]).astype(dtype)
    return k, v


def stored(kind: str, k_new, v_new) -> dict:
    """What a chunk's k/v [B, T, K, H] become in a layer's arrays: k, v (int8: codes, plus
    their scales ks, vs)."""
    if kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
        return {"k": kq, "v": vq, "ks": ks, "vs": vs}
    return {"k": k_new, "v": v_new}


def write_layer(cache: KVCache, layer: int, k_new, v_new, slots) -> dict:
    """One layer's arrays after writing a chunk's k/v [B, T, K, H] at `slots` [B, T]."""
    new = stored(cache.kind, k_new, v_new)
    return {name: scatter_rows(old, new[name], slots) for name, old in layer_arrays(cache, layer).items()}


def slot_positions(cache: KVCache, starts, lengths=None, slots=None):
    """(position held by each slot [B, S], slot valid [B, S]).

    Before a chunk is appended (lengths None), or after it is written at `slots`.
    """
    B, S = cache.batch_size, cache.max_len
    if cache.slot_pos is None:   # dense and int8: slot s holds position s
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
        end = starts if lengths is None else starts + lengths
        return pos, pos < end[:, None]
    pos = cache.slot_pos
    if lengths is not None:
        T = slots.shape[1]
        chunk = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        pos = jax.vmap(lambda p, sl, n: p.at[sl].set(n, mode="drop"))(pos, slots, chunk)
    return pos, pos >= 0


def assemble(cache: KVCache, layers: list, starts, lengths, slots) -> KVCache:
    """The cache after a chunk: new per-layer arrays, lengths and slot positions."""
    if cache.kind == "kivi":
        rest = tuple({k: v for k, v in l.items() if k not in ("k_codes", "v_codes")} for l in layers)
        return cache.replace(keys=tuple(l["k_codes"] for l in layers),
                             values=tuple(l["v_codes"] for l in layers), extras=rest,
                             lengths=starts + lengths)
    changes = dict(keys=tuple(l["k"] for l in layers), values=tuple(l["v"] for l in layers),
                   lengths=starts + lengths)
    if cache.kind == "int8":
        changes.update(key_scales=tuple(l["ks"] for l in layers),
                       value_scales=tuple(l["vs"] for l in layers))
    if cache.hybrid:
        changes["slot_pos"] = slot_positions(cache.ring_view(), starts, lengths, slots[1])[0]
    elif cache.slot_pos is not None:
        changes["slot_pos"] = slot_positions(cache, starts, lengths, slots)[0]
    return cache.replace(**changes)


def attend_blocks(chunk, cache: KVCache, write) -> tuple[list, dict]:
    """(key blocks, this layer's new arrays) of a dense, int8, ring or hybrid cache.

    Normally: write the chunk first, then read the whole buffer back as one block (the read
    depends on the write, so XLA updates the donated buffer in place), only its first
    `write.live` slots when the caller planned that. A ring taking several tokens is the
    exception: a later token of the chunk may overwrite a slot an earlier query still needs,
    so the queries see the cache as it was plus the chunk's own keys, and the chunk is
    written afterwards (XLA copies that layer's buffers once per such chunk; a one-token
    step never needs it: the slot it overwrites is just outside its query's window).
    """
    layer, slots, live = chunk.layer, write.slots, write.live
    if cache.hybrid:                       # this layer alone: a ring or a full buffer
        ring = cache.rings[layer] > 0
        cache, layer, slots = cache.layer_view(layer), 0, slots[1 if ring else 0]
        live = None if ring else live
    k, v = chunk.k, chunk.v
    if cache.slot_pos is not None and k.shape[1] > 1:
        old = read_layer(cache.kind, layer_arrays(cache, layer), k.dtype)
        return [(*old, *slot_positions(cache, write.starts)), chunk.own_block()], \
            write_layer(cache, layer, k, v, slots)
    new_layer = write_layer(cache, layer, k, v, slots)
    pos, valid = slot_positions(cache, write.starts, chunk.lengths, slots)
    view = new_layer
    if live is not None and live < cache.max_len:   # skip slots no row has reached
        view = {name: a[:, :, :live] for name, a in new_layer.items()}
        pos, valid = pos[:, :live], valid[:, :live]
    return [(*read_layer(cache.kind, view, k.dtype), pos, valid)], new_layer


def flash_layer(chunk, cache: KVCache, write) -> bool:
    """Whether this layer's chunk takes `attend_flash`: the caller asked (write.flash), the
    chunk has several tokens (a decode step keeps its static live prefix), and the layer is a
    full dense/int8 buffer (not a ring, not pressed, not KIVI)."""
    if write is None or not write.flash or chunk.k.shape[1] == 1 or cache.kind not in ("dense", "int8"):
        return False
    if cache.pressed:
        return False
    return cache.rings[chunk.layer] == 0 if cache.hybrid else cache.slot_pos is None


def attend_flash(chunk, cache: KVCache, write) -> tuple:
    """(out [B, T, N, H], this layer's new arrays) of a chunk on a full dense/int8 layer.

    The chunk is written first (in place, as in `attend_blocks`); then key blocks of
    w = min(write.flash, max_len) slots are read in `lax.fori_loop`s whose bounds are traced:
    blocks past the longest row's end (every query's causal limit) are never visited, nor,
    on a windowed layer without sinks, blocks wholly before every query's window. So one
    program serves every chunk of a width, whatever the cache holds. Without a window, the
    blocks before every row's start are seen whole by every query: they are read with no
    mask (most of a long prompt's blocks). A last block that would run past max_len is read
    from max_len - w (dynamic_slice clamps) with the slots an earlier block already covered
    masked out. Queries are laid out [B, K, G * T, H] and scaled once (`group_queries`,
    `fold_scale`), so each block is two batched matmuls per kv head with no transpose or
    rescaling of its scores inside the loop."""
    layer, slots = chunk.layer, write.slots
    if cache.hybrid:
        cache, layer, slots = cache.layer_view(layer), 0, slots[0]
    new_layer = write_layer(cache, layer, chunk.k, chunk.v, slots)
    B, T, N, H = chunk.q.shape
    K = chunk.k.shape[2]
    S, w, G = cache.max_len, min(write.flash, cache.max_len), N // K
    ends = write.starts + chunk.lengths
    hi = (jnp.max(ends) + w - 1) // w
    qm, scale = fold_scale(group_queries(chunk.q, K), chunk.score_args[0])

    def block(j, masked):
        first = j * w
        at = jnp.minimum(first, S - w) if masked else first   # unmasked blocks end before S
        view = {name: jax.lax.dynamic_slice_in_dim(a, at, w, axis=2) for name, a in new_layer.items()}
        kb, vb = read_layer(cache.kind, view, chunk.k.dtype)
        pos = jnp.broadcast_to(at + jnp.arange(w, dtype=jnp.int32)[None, :], (B, w))
        if chunk.sinks:   # scores rotated by cache position: the layer's own scorer, rows regrouped
            s = chunk.score(kb, pos).reshape(B, K, G * T, w)
        else:
            s = grouped_scores(qm, kb, scale, chunk.score_args[1])
        if not masked:
            return s, None, vb
        valid = (pos >= first) & (pos < ends[:, None])
        return s, group_mask(attention_mask(chunk.positions, pos, valid, chunk.window, chunk.sinks), G), vb

    if chunk.window is None:
        whole = jnp.minimum(jnp.min(write.starts) // w, hi)   # blocks every query sees whole
        segments = [(jnp.int32(0), whole, False), (whole, hi, True)]
    else:
        lo = jnp.int32(0) if chunk.sinks else jnp.maximum(jnp.min(write.starts) - chunk.window + 1, 0) // w
        segments = [(lo, hi, True)]
    out = softmax_loop(block, segments, (B, K, G * T, H))
    return ungroup(out, T, chunk.q.dtype), new_layer
