"""One layer's attention over whichever layout the cache has: the seam between model and storage.

Axis letters: B batch, T chunk, S key slots, N query heads, K kv heads, H head dim.

The model (kvjax/attention.py) projects q/k/v and applies rotary, then hands this module
one `LayerChunk` and the forward call's `CacheWrite`; `attend` picks the layout's own read
and write:

  no cache              the chunk's own keys
  paged                 cache/paged.py (pools shared by rows, the engine's layout)
  pressed, pooled       cache/pressed.py (per-head slots; a press decides what the chunk keeps;
                        a pressed hybrid cache's ring layers stay rings, read as below)
  kivi                  cache/kivi.py (quantised store + full-precision residual)
  dense, int8, rings    cache/dense.py (window, sinks and hybrid caches included; a
                        multi-token chunk on a full layer, when write.flash asks: key
                        blocks in a loop with an online softmax)

Every path ends in attention_math's one softmax over key blocks, so masks, windows,
soft-capping and GQA are the same on every layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..attention_math import attention_mask, softmax_blocks
from . import dense, kivi, paged, pressed
from .core import PAGED, KVCache


@dataclass(frozen=True)
class CacheWrite:
    """What a forward call's cache write needs, carried from the model to every layer.

    starts: int32 [B] first position of the chunk per row; slots: where each token goes
    (dense.chunk_slots: [B, T], or a (full, ring) pair for a hybrid cache; None for pressed,
    kivi and paged caches, which place tokens themselves); live (static): read only slots
    [0, live) of a dense/int8 cache; press (static) and budgets (int32 [L, B, ...]): compact
    the chunk into a pressed cache (kvjax/press/); flash (static key block width, or None):
    a multi-token chunk on a full dense/int8 layer reads the cache in key blocks of this
    width up to its rows' ends, with an online softmax (dense.attend_flash; `live` unused)."""

    starts: jax.Array | None = None
    slots: Any = None
    live: int | None = None
    press: Any = None
    budgets: dict | None = None
    flash: int | None = None

    def layer_budget(self, layer: int) -> dict:
        """This layer's slice of the press budgets ({} without a press)."""
        return {} if self.budgets is None else {k: v[layer] for k, v in self.budgets.items()}


class LayerChunk(NamedTuple):
    """One layer's chunk as the layouts see it.

    q [B, T, N, H] (rotated, unless the cache stores keys unrotated: sinks); k, v [B, T, K, H];
    positions int32 [B, T]; lengths int32 [B] real tokens; window / sinks: what a query of
    this layer sees; score(keys [B, K, S, H], k_pos) -> float32 [B, K, G, T, S] (the model's
    scaled, soft-capped, for sinks rotation-aware scores); plain_score(q, keys): the same
    without cache-position rotation; press_keep(attn_sums) -> pressed.Keep: the press's
    decision for this chunk (None when no press runs); score_args: (scale, softcap) of the
    model's `scores`, for readers that lay queries out their own way (`attend_flash`)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array
    layer: int
    window: int | None
    sinks: int
    score: Callable
    plain_score: Callable
    press_keep: Callable | None = None
    score_args: tuple = (None, None)

    def own_block(self) -> tuple:
        """The chunk's own keys as a block: (keys, values [B, K, T, H], positions, valid [B, T])."""
        T = self.k.shape[1]
        valid = jnp.arange(T, dtype=jnp.int32)[None, :] < self.lengths[:, None]
        return (self.k.transpose(0, 2, 1, 3), self.v.transpose(0, 2, 1, 3), self.positions, valid)


def attend(chunk: LayerChunk, cache: KVCache | None, write: CacheWrite | None):
    """(out [B, T, N, H], this layer's new cache arrays or None) for any layout."""
    if cache is None:
        return softmax_over(chunk, [chunk.own_block()]), None
    if cache.kind == PAGED:
        return paged.paged_attention(chunk.q, chunk.k, chunk.v, chunk.positions, chunk.lengths, cache,
                                     chunk.layer, chunk.window, chunk.sinks, chunk.plain_score)
    if cache.pressed and not cache.ring_layer(chunk.layer):
        if cache.hybrid:                 # a pressed full layer of a hybrid cache, alone
            return pressed.attend(chunk._replace(layer=0), cache.layer_view(chunk.layer), write)
        return pressed.attend(chunk, cache, write)
    if cache.kind == "kivi":
        blocks, new_layer = kivi.attend_blocks(dense.layer_arrays(cache, chunk.layer), cache.quant, chunk.k,
                                               chunk.v, write.starts, chunk.lengths, chunk.own_block())
    elif dense.flash_layer(chunk, cache, write):
        return dense.attend_flash(chunk, cache, write)
    else:
        blocks, new_layer = dense.attend_blocks(chunk, cache, write)
    return softmax_over(chunk, blocks), new_layer


def softmax_over(chunk: LayerChunk, blocks: list):
    """One softmax over blocks of (keys [B, K, S, H], values, positions [B, S], valid [B, S])."""
    return softmax_blocks([(chunk.score(kb, kp), attention_mask(chunk.positions, kp, kv, chunk.window,
                                                                chunk.sinks), vb)
                           for kb, vb, kp, kv in blocks], chunk.q.dtype)
