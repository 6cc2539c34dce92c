"""Cache surgery: truncate rows, drop their newest tokens, empty them, cut layers' slots.

Axis letters: B batch, K kv heads, S slots per head, P pool slots (K * S), W ring slots,
L layers, R KIVI residual_length.

What benchmarks and speculative decoding need: take back tokens a row has seen (a rejected
draft, a query read again), start a row afresh, or keep only the slots a compressed context
uses. Each function returns a new cache; the key/value buffers are shared with the input
(nothing is copied) except in `cut_slots`, whose arrays are all new.

`truncate(cache, n)` makes row b hold what a cache that had seen only its first n[b] tokens
holds, layout by layout:

  dense, int8   `lengths` = n; slots past n keep stale values that every read masks by
                length, and the next write overwrites them.
  window, sinks, and the ring layers of a hybrid cache (its full layers: as dense):
                `slot_pos` [B, W] entries >= n become -1 (empty), so position n is written
                where it would have been and nothing stale is visible. Refused once the row
                has seen more tokens than the W ring slots (sinks included) unless n is its
                length, or n <= num_sinks (0 for a window): the tokens a row of n would hold
                were overwritten.
  kivi          `lengths` = n. Positions [0, Q) are quantised in blocks of R (Q = L // R * R),
                the rest is in the full-precision residual; refused when n < Q and n is not
                a multiple of R: the residual would have to hold quantised tokens again.
  pressed       per kv head, slots whose position (`head_pos`) is >= n are emptied and
                `head_fill` counts them off; kept slots are packed in position order, so the
                emptied ones are the used slots' tail and the packing holds.
  pooled        as pressed over the pool: emptied slots lose their owner (`head_owner` -1)
                and the owning head's fill drops by one each.
  paged         refused: the engine's pages are freed by its own allocator.

`drop_newest(cache, m)` is `truncate(cache, lengths - m)` and `empty_rows(cache, rows)` is
truncation to 0, which every layout but paged allows. `cut_slots(cache, layer_slots)` keeps
the first `layer_slots[l]` slots of layer l (dense, int8, pressed, pooled: used slots are at
the front); rings and KIVI are refused (their slot of a position depends on the slot count).

check=True (default) validates on the host (it reads `lengths`, so it waits for the cache)
and raises ValueError naming the row, the value and the limit. check=False skips it and is
traceable: for a timing loop, or inside a jitted program whose caller has checked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..sharding import to_host
from .core import PAGED, KVCache


def truncate(cache: KVCache, lengths, *, check: bool = True) -> KVCache:
    """Row b keeps only its tokens at positions < lengths[b] (see the module docstring).

    Args:
      cache: any cache but paged.
      lengths: int, or ints [B]: tokens each row keeps, 0 <= lengths[b] <= cache.lengths[b].
    Returns:
      the cache as if it had seen only those tokens (key/value buffers shared with `cache`).
    """
    if check:
        lengths = _check_truncate(cache, lengths, "truncate")
    return cache.replace(**_truncated(_positions(cache), lengths))


def drop_newest(cache: KVCache, counts, *, check: bool = True) -> KVCache:
    """Row b forgets its newest counts[b] tokens: `truncate(cache, cache.lengths - counts)`.

    Args:
      counts: int, or ints [B]: tokens each row drops, 0 <= counts[b] <= cache.lengths[b].
    """
    if check:
        held = _host_lengths(cache)
        counts = _host_rows(counts, cache.batch_size, "drop_newest", "counts")
        for row in np.flatnonzero((counts < 0) | (counts > held)):
            raise ValueError(f"drop_newest: row {row} holds {held[row]} tokens; it can drop "
                             f"0..{held[row]}, not {counts[row]}")
        _check_truncate(cache, held - counts, "drop_newest")
    return cache.replace(**_dropped(_positions(cache), counts))


def empty_rows(cache: KVCache, rows=None, *, check: bool = True) -> KVCache:
    """The cache with rows `rows` empty (truncated to 0 tokens); the other rows unchanged.

    Args:
      rows: None (every row), row indices, or a bool mask [B].
    """
    B = cache.batch_size
    if rows is None:
        mask = np.ones(B, bool)
    elif isinstance(rows, jax.Array) and rows.dtype == bool:
        mask = rows
    else:
        mask = _row_mask(rows, B)
    if check:
        _check_kind(cache, "empty_rows")
    return cache.replace(**_emptied(_positions(cache), mask))


def cut_slots(cache: KVCache, layer_slots, *, check: bool = True) -> KVCache:
    """Layer l cut to its first layer_slots[l] slots (a pool: pool slots), every array new.

    For dense, int8, pressed and pooled caches, whose used slots are packed at the front, so
    nothing held is lost (refused, with check, when a row uses more). The result shares no
    buffer with `cache`, so it may be donated while `cache` is still used.

    Args:
      layer_slots: L ints, 1 <= layer_slots[l] <= the layer's slots.
    """
    sizes = [int(s) for s in layer_slots]
    if check:
        _check_cut(cache, sizes)
    cut = lambda arrays, axis: tuple(_first(a, n, axis) for a, n in zip(arrays, sizes))  # noqa: E731
    changes = dict(keys=cut(cache.keys, 2), values=cut(cache.values, 2),
                   key_scales=cut(cache.key_scales, 2), value_scales=cut(cache.value_scales, 2),
                   head_pos=cut(cache.head_pos, 2), head_owner=cut(cache.head_owner, 1),
                   head_fill=tuple(jnp.copy(f) for f in cache.head_fill),
                   lengths=jnp.copy(cache.lengths))
    return cache.replace(**changes)


# ----------------------------------------------------------------------------- traced cores

def _positions(cache: KVCache) -> dict:
    """The arrays surgery rewrites: lengths and what records which slot holds which position."""
    return dict(lengths=cache.lengths, slot_pos=cache.slot_pos, head_pos=cache.head_pos,
                head_fill=cache.head_fill, head_owner=cache.head_owner)


def _truncate_positions(parts: dict, n) -> dict:
    """parts after every row b keeps positions < n[b] (n int32 [B], or a scalar for all rows)."""
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), parts["lengths"].shape)   # [B]
    out = dict(parts, lengths=n)
    if parts["slot_pos"] is not None:                                         # rings: [B, W]
        sp = parts["slot_pos"]
        out["slot_pos"] = jnp.where(sp >= n[:, None], -1, sp)
    if parts["head_owner"]:
        out.update(_truncate_pool(parts, n))
    elif parts["head_pos"]:
        pos, fill = [], []
        for hp, f in zip(parts["head_pos"], parts["head_fill"]):              # [B, K, S], [B, K]
            gone = hp >= n[:, None, None]
            pos.append(jnp.where(gone, -1, hp))
            fill.append((f - gone.sum(-1)).astype(jnp.int32))
        out.update(head_pos=tuple(pos), head_fill=tuple(fill))
    return out


def _truncate_pool(parts: dict, n) -> dict:
    """Pooled layout: slots of positions >= n[b] emptied, each owner's fill counted down."""
    pos, fill, owner = [], [], []
    for hp, f, own in zip(parts["head_pos"], parts["head_fill"], parts["head_owner"]):
        gone = hp[:, 0, :] >= n[:, None]                                      # [B, P]
        heads = jnp.arange(f.shape[1], dtype=jnp.int32)[None, :, None]         # [1, K, 1]
        owned = gone[:, None, :] & (own[:, None, :] == heads)                 # [B, K, P]
        fill.append((f - owned.sum(-1)).astype(jnp.int32))
        pos.append(jnp.where(gone[:, None, :], -1, hp))
        owner.append(jnp.where(gone, -1, own))
    return dict(head_pos=tuple(pos), head_fill=tuple(fill), head_owner=tuple(owner))


# One small program each (not eager ops per layer): a timing loop calls them between steps.
_truncated = jax.jit(_truncate_positions)
_dropped = jax.jit(lambda parts, counts: _truncate_positions(
    parts, parts["lengths"] - jnp.asarray(counts, jnp.int32)))
_emptied = jax.jit(lambda parts, mask: _truncate_positions(
    parts, jnp.where(mask, 0, parts["lengths"])))


def _first(a, n: int, axis: int):
    """a's first n entries along `axis`, always a new array (a full slice would be `a` itself)."""
    if n == a.shape[axis]:
        return jnp.copy(a)
    return jax.lax.slice_in_dim(a, 0, n, axis=axis)


# ----------------------------------------------------------------------------- host checks

def _host_lengths(cache: KVCache) -> np.ndarray:
    return to_host(cache.lengths).astype(np.int64)


def _host_rows(x, B: int, what: str, name: str) -> np.ndarray:
    """x (an int or B ints) as int64 [B]; ValueError naming `name` otherwise."""
    a = np.asarray(jax.device_get(x))
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer) or a.ndim > 1 or a.size not in (1, B):
        raise ValueError(f"{what}: {name} must be an int or {B} ints (one per row), got {x!r}")
    return np.broadcast_to(a.astype(np.int64).reshape(-1), (B,)).copy()


def _row_mask(rows, B: int) -> np.ndarray:
    a = np.asarray(rows)
    if a.dtype == bool:
        if a.shape != (B,):
            raise ValueError(f"empty_rows: a row mask must be {B} bools, got shape {a.shape}")
        return a
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= B):
        raise ValueError(f"empty_rows: rows must be indices in [0, {B}) or a bool mask, got {rows!r}")
    mask = np.zeros(B, bool)
    mask[a.astype(np.int64).reshape(-1)] = True
    return mask


def _check_kind(cache: KVCache, what: str) -> None:
    if cache.kind == PAGED:
        raise ValueError(f"{what}: a paged cache's pages belong to the engine's allocator "
                         f"(kvjax.Engine frees them); surgery works on per-row caches")


def _check_truncate(cache: KVCache, lengths, what: str) -> np.ndarray:
    """lengths as int64 [B] after checking every row can be cut back to it."""
    _check_kind(cache, what)
    held = _host_lengths(cache)
    n = _host_rows(lengths, cache.batch_size, what, "lengths")
    for b in np.flatnonzero((n < 0) | (n > held)):
        raise ValueError(f"{what}: row {b} holds {held[b]} tokens; it can keep 0..{held[b]}, "
                         f"not {n[b]}")
    if cache.slot_pos is not None:
        _check_ring(cache, held, n, what)
    if cache.kind == "kivi":
        _check_kivi(cache, held, n, what)
    return n


def _check_ring(cache: KVCache, held: np.ndarray, n: np.ndarray, what: str) -> None:
    W = cache.slot_pos.shape[1]                      # ring slots (a hybrid cache: its ring layers)
    floor = cache.num_sinks if cache.kind == "sinks" else 0
    lost = (held > W) & (n < held) & (n > floor)
    for b in np.flatnonzero(lost):
        ring = f"{W}-slot ring" + (f" ({floor} of them sinks)" if floor else "")
        raise ValueError(f"{what}: row {b} has seen {held[b]} tokens, more than its {ring} holds, "
                         f"so positions it would need to keep {n[b]} tokens were overwritten; a "
                         f"ring can be cut back only while it has seen at most {W} tokens (or to "
                         f"<= {floor} tokens)")


def _check_kivi(cache: KVCache, held: np.ndarray, n: np.ndarray, what: str) -> None:
    R = cache.quant[2]
    Q = held // R * R                                 # positions [0, Q) are quantised
    for b in np.flatnonzero((n < Q) & (n % R != 0)):
        raise ValueError(f"{what}: row {b} of this KIVI cache has positions 0..{Q[b] - 1} quantised "
                         f"in blocks of residual_length={R}; keeping {n[b]} tokens would need "
                         f"positions {n[b] // R * R}..{n[b] - 1} in full precision again (it can "
                         f"keep {Q[b]}..{held[b]} tokens, or a multiple of {R})")


def used_slots(cache: KVCache) -> np.ndarray:
    """int [L, B] on the host: slots each row uses per layer (pressed: its fullest kv head; a
    pool: all of its heads; otherwise the row's length)."""
    if cache.pooled:
        return np.stack([to_host(f).sum(axis=1) for f in cache.head_fill])
    if cache.pressed:
        return np.stack([to_host(f).max(axis=1) for f in cache.head_fill])
    used = to_host(cache.lengths)
    return np.broadcast_to(used, (len(cache.keys), used.shape[0]))


def _check_cut(cache: KVCache, sizes: list) -> None:
    _check_kind(cache, "cut_slots")
    if cache.kind not in ("dense", "int8") or cache.hybrid:
        layout = "a hybrid cache's ring layers" if cache.hybrid else f"a {cache.kind!r} cache"
        raise ValueError(f"cut_slots: {layout} place a position by the slot count (a ring's slot "
                         f"p mod W, KIVI's blocks of residual_length), so fewer slots would move "
                         f"tokens; allocate the smaller cache instead")
    have = [cache.layer_slots(layer) for layer in range(len(cache.keys))]
    if len(sizes) != len(have) or any(not 1 <= s <= h for s, h in zip(sizes, have)):
        raise ValueError(f"cut_slots: layer_slots must give {len(have)} slot counts, each from 1 to "
                         f"the layer's slots {have}; got {sizes}")
    used = used_slots(cache)
    for layer, b in np.argwhere(used > np.asarray(sizes)[:, None]):
        raise ValueError(f"cut_slots: row {b} uses {used[layer, b]} slots of layer {layer}; it cannot "
                         f"be cut to {sizes[layer]} slots")
