"""DecodingPress: keep a long generation inside `target_size + compression_interval` slots.

Axis letters: B batch, K kv heads, S slots, H head dim, L layers.

kvpress 0.5.5's rule: every forward after the prefill counts as one step (a prefilled
question counts as one); when the count reaches `compression_interval` (or a forward's
chunk is at least `target_size` long), the whole cache of every layer is cut to
`target_size` entries per head by the base press's scores, after that step's attention,
and the count restarts. Here the base press scores the cached keys/values themselves
(`score_cache`), so it must be one that needs no queries: Knorm, KeyDiff, StreamingLLM,
Random. The steps at which compression happens are fixed by the interval, so `generate`
plans them statically: a scan of decode steps, a compaction, and so on (see kvjax/decode/plans.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache, as_pressed, assemble_pressed, gather_layer_heads, layer_arrays, read_layer
from .base import Press, top_per_head
from .norms import KeyDiffPress, KnormPress, RandomPress, StreamingLLMPress

CACHE_SCORERS = (KnormPress, KeyDiffPress, StreamingLLMPress, RandomPress)


@dataclass(frozen=True)
class DecodingPress(Press):
    base_press: Press = None
    compression_interval: int = 512
    target_size: int = 2048

    def __post_init__(self):
        if not isinstance(self.base_press, CACHE_SCORERS):
            raise ValueError(f"DecodingPress scores the whole cache from its keys, so base_press must be "
                             f"one of {[c.__name__ for c in CACHE_SCORERS]}; got "
                             f"{type(self.base_press).__name__}")
        for name in ("compression_interval", "target_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DecodingPress.{name} must be an int >= 1, got {v!r}")

    def static(self):
        return self

    def slots_needed(self) -> int:
        """Slots a layer needs in steady state: target_size kept + the tokens of one interval."""
        return self.target_size + self.compression_interval


def compress_cache(cache: KVCache, press: DecodingPress, key=None, target_size=None) -> KVCache:
    """Every layer cut to `press.target_size` kept slots per head (packed, position order).
    target_size: instead of the press's (an int or a traced int32 scalar: one program for
    every size)."""
    cache = as_pressed(cache)
    target = press.target_size if target_size is None else target_size
    key = jax.random.key(getattr(press.base_press, "seed", 0)) if key is None else key
    layers, positions, fills = [], [], []
    for layer in range(len(cache.keys)):
        arrays = layer_arrays(cache, layer)
        pos = cache.head_pos[layer]                                                # [B, K, S]
        valid = pos >= 0
        k, v = read_layer(cache.kind, arrays, jnp.float32)
        scores = press.base_press.score_cache(k, v, pos, valid, layer, key)
        B, K, S = pos.shape
        n = jnp.full((B, K), target, jnp.int32)
        keep = _top_slots(scores, valid, n)                                        # [B, K, S]
        # packed order: kept slots first, by position; then the rest
        sort_key = jnp.where(keep, pos, jnp.iinfo(jnp.int32).max)
        order = jnp.argsort(sort_key, axis=-1, stable=True)
        layers.append(gather_layer_heads(cache, layer, order))
        new_keep = jnp.take_along_axis(keep, order, axis=-1)
        positions.append(jnp.where(new_keep, jnp.take_along_axis(pos, order, axis=-1), -1))
        fills.append(keep.sum(-1).astype(jnp.int32))
    return assemble_pressed(cache, layers, positions, fills, cache.lengths)


def _top_slots(scores, valid, n):
    """bool [B, K, S]: per head, the n best valid slots (per-head validity)."""
    B, K, S = scores.shape
    flat_valid = valid.reshape(B * K, S)
    keep = top_per_head(scores.reshape(B * K, 1, S), flat_valid, n.reshape(B * K))
    return keep.reshape(B, K, S)
