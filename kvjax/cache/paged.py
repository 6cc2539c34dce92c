"""Paged KV storage: one pool of pages per layer, a page table per row, and attention over it.

Axis letters: B rows, T chunk, P pages in the pool, K kv heads, Z page size (tokens per
page), H head dim, W pages per row in the page table, N query heads.

Layout: layer l keeps keys[l] and values[l] as pools [P, K, Z, H]. A row's token at
position p lives in pool page `page_table[b, p // Z]` at offset p % Z. Pages belong to
no row in particular: the host (kvjax/engine/pages.py) hands them out, shares full prompt pages
between rows (prefix cache) and takes them back when a request finishes, so the memory
held follows the tokens actually cached, not max_len per row.

[P, K, Z, H] keeps one (page, kv head) block contiguous ([Z, H]), the unit a ragged paged
attention kernel reads, and a page is written with one scatter per chunk.

The model reaches this module through the layout dispatch of kvjax/cache/attend.py: a KVCache of kind
"paged" (keys/values = the pools, lengths = each row's tokens before the chunk,
page_table) sends the rotated q/k/v here (`paged_attention`). `attend_pages` is the read
side and the place an accelerator kernel plugs in (e.g. tokamax's ragged paged
attention); its pure-JAX reference gathers each row's pages into a dense [B, K, W*Z, H]
view and reuses kvjax/attention_math.py's scores/mask/softmax, so windows, soft-capping and GQA
behave exactly as on the dense cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..attention_math import attend_view
from .core import PAGED as KIND, KVCache
from .dense import scatter_rows


def paged_cache(keys: tuple, values: tuple, lengths, page_table, views: tuple = ()) -> KVCache:
    """A KVCache view of the pools for one program: rows' lengths before the chunk, their pages.

    views: optional per-layer dense copies of the rows' pages ({"k", "v"} [B, K, W*Z, H], as
    `gather_pages` makes them), carried through a decode call's steps: a step then writes its
    token into the pool and into the view and attends over the view, so the pages are copied
    out once per call instead of once per step (kept in `extras`)."""
    return KVCache(keys=tuple(keys), values=tuple(values), lengths=lengths, page_table=page_table,
                   extras=tuple(views), kind=KIND)


def gather_views(keys: tuple, values: tuple, page_table) -> tuple:
    """Per-layer dense views of each row's pages: ({"k", "v"} [B, K, W*Z, H], ...)."""
    return tuple({"k": gather_pages(k, page_table), "v": gather_pages(v, page_table)}
                 for k, v in zip(keys, values))


def init_pools(num_layers: int, num_pages: int, kv_heads: int, page_size: int, head_dim: int, dtype,
               sharding=None):
    """Zeroed pools: (keys, values), each a tuple of L arrays [P, K, Z, H]."""
    shape = (num_pages, kv_heads, page_size, head_dim)

    def make():
        return tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))

    if sharding is not None:
        make_one = jax.jit(make, out_shardings=(sharding,) * num_layers)
        return make_one(), make_one()
    return make(), make()


def token_pages(page_table, starts, lengths, T: int, num_pages: int, page_size: int):
    """(page [B, T], offset [B, T]) where each token of a chunk appended at `starts` goes.

    Padding (t >= lengths[b]) gets page P (out of range: the scatter drops it)."""
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = starts[:, None] + t                                                   # [B, T]
    W = page_table.shape[1]
    page = jnp.take_along_axis(page_table, jnp.minimum(pos // page_size, W - 1), axis=1)
    page = jnp.where(t < lengths[:, None], page, num_pages)
    return page, pos % page_size


def write_pages(pool, new, page, offset):
    """pool [P, K, Z, H] <- new [B, T, K, H] at (page [B, T], offset [B, T]); page P is dropped."""
    # Advanced indices around a slice put their axes first: pool[page, :, offset] is [B, T, K, H].
    return pool.at[page, :, offset].set(new.astype(pool.dtype), mode="drop")


def gather_pages(pool, page_table):
    """Each row's pages as a dense view: pool [P, K, Z, H], page_table [B, W] -> [B, K, W*Z, H]."""
    g = pool[page_table]                                                        # [B, W, K, Z, H]
    B, W, K, Z, H = g.shape
    return g.transpose(0, 2, 1, 3, 4).reshape(B, K, W * Z, H)


def attend_pages(q, k_pool, v_pool, page_table, positions, ends, window, sinks, score):
    """Reference paged attention (the oracle for a kernel): q [B, T, N, H] at positions [B, T]
    over each row's first `ends[b]` cached tokens -> [B, T, N, H].

    score(q, keys [B, K, S, H]) -> float32 [B, K, G, T, S]: the model's scaled (and possibly
    soft-capped) scores, so this function owns only the paging.
    """
    kb, vb = gather_pages(k_pool, page_table), gather_pages(v_pool, page_table)
    return attend_view(q, kb, vb, positions, ends, window, sinks, score)


def paged_attention(q, k, v, positions, lengths, cache: KVCache, layer: int, window, sinks, score):
    """Write a chunk's k/v [B, T, K, H] into the pages, then attend over each row's pages.

    q [B, T, N, H] (rotated), positions [B, T], lengths [B] real tokens of the chunk;
    cache.lengths: tokens each row held before the chunk. Returns ([B, T, N, H], this
    layer's new pools {"k", "v"}).
    """
    k_pool, v_pool = cache.keys[layer], cache.values[layer]
    P, _, Z, _ = k_pool.shape
    starts, table = cache.lengths, cache.page_table
    page, offset = token_pages(table, starts, lengths, positions.shape[1], P, Z)
    k_pool, v_pool = write_pages(k_pool, k, page, offset), write_pages(v_pool, v, page, offset)
    if not cache.extras:
        out = attend_pages(q, k_pool, v_pool, table, positions, starts + lengths, window, sinks, score)
        return out, {"k": k_pool, "v": v_pool}
    view = cache.extras[layer]                              # a decode call's dense copy
    S = view["k"].shape[2]
    t = jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
    slot = jnp.where(t < lengths[:, None], positions, S)   # padding dropped
    kb, vb = scatter_rows(view["k"], k, slot), scatter_rows(view["v"], v, slot)
    out = attend_view(q, kb, vb, positions, starts + lengths, window, sinks, score)
    return out, {"k": k_pool, "v": v_pool, "view": {"k": kb, "v": vb}}
