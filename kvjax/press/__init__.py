"""KV-cache compression presses, with kvpress's class and argument names (kvpress 0.5.5).

    from kvjax import press
    p = press.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5)
    cache = kvjax.init_cache(cfg, batch_size=B, max_len=kept + room)    # only as large as what is kept
    logits, cache = kvjax.prefill(cfg, params, context, lengths, cache, press=p)
    out = kvjax.generate(cfg, params, question, q_lengths, max_new_tokens=N, cache=cache)
    press.kept_positions(cache)   # per layer int32 [B, kv_heads, slots]: original position, -1 empty

Modules: base.py (inputs, budgets, top-k per head), norms.py (Knorm, KeyDiff, StreamingLLM,
Random), window.py (SnapKV, PyramidKV, TOVA, ObservedAttention), expected.py
(ExpectedAttention), wrappers.py (AdaKV, CriticalKV, ChunkKV, KeyRerotation), decoding.py
(DecodingPress and whole-cache compaction), kvzip.py (KVzip's settings and scorer; its
whole-model passes run in kvjax/decode/kvzip.py), host.py (checks and budgets before anything
runs). A press returns a `Keep` per layer; the pressed layout (kvjax/cache/pressed.py) writes it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..cache import KVCache, cache_bytes as dense_bytes, init_cache as dense_cache
from ..config import ModelConfig
from .base import Keep, LayerInputs, Press, ScorerPress, n_kept
from .decoding import DecodingPress, compress_cache
from .expected import ExpectedAttentionPress
from .norms import KeyDiffPress, KnormPress, RandomPress, StreamingLLMPress
from .window import ObservedAttentionPress, PyramidKVPress, SnapKVPress, TOVAPress
from .wrappers import AdaKVPress, ChunkKVPress, CriticalKVPress, KeyRerotationPress
from .kvzip import KVzipPress, chat_context

__all__ = ["Press", "ScorerPress", "Keep", "LayerInputs", "KnormPress", "KeyDiffPress",
           "StreamingLLMPress", "RandomPress", "SnapKVPress", "PyramidKVPress", "TOVAPress",
           "ObservedAttentionPress", "ExpectedAttentionPress", "AdaKVPress", "CriticalKVPress",
           "ChunkKVPress", "KeyRerotationPress", "KVzipPress", "chat_context", "DecodingPress",
           "kept_positions", "init_cache",
           "layer_budgets", "n_kept", "compress_cache", "cache_bytes", "pressed_cache"]


def kept_positions(cache: KVCache) -> list:
    """Per layer int32 [B, kv_heads, slots]: the original position held in each slot, -1 if empty.

    For a cache that was never pressed, slot s of every head holds position s (or -1)."""
    if cache.pooled:             # per-head view of the pool: a slot shows only for its owner
        out = []
        for pos, owner, fill in zip(cache.head_pos, cache.head_owner, cache.head_fill):
            heads = jnp.arange(fill.shape[1], dtype=jnp.int32)[None, :, None]
            out.append(jnp.where(owner[:, None, :] == heads, pos, -1))
        return out
    if cache.pressed:
        return list(cache.head_pos)
    out = []
    for k in cache.keys:
        B, K, S = k.shape[:3]
        s = jnp.arange(S, dtype=jnp.int32)
        out.append(jnp.broadcast_to(jnp.where(s[None, :] < cache.lengths[:, None], s[None, :], -1)[:, None],
                                    (B, K, S)))
    return out


def layer_budgets(press: Press, cfg: ModelConfig, context_len: int) -> list[int]:
    """Slots each layer keeps for a context of `context_len` tokens (the most any head may take)."""
    return [int(x) for x in press.kept_bound(np.array([context_len]), cfg)[:, 0]]


def init_cache(cfg: ModelConfig, batch_size: int, context_len: int, press: Press, room: int = 0,
               dtype=None, kind: str = "dense") -> KVCache:
    """An empty pressed cache sized for `press` on contexts of up to `context_len` tokens plus
    `room` more (question and answer) per row: layer l gets budget_l + room slots, so
    PyramidKV's shrinking budgets give shrinking layers. Exact size: `KVCache.nbytes`."""
    if not isinstance(room, int) or room < 0:
        raise ValueError(f"room must be an int >= 0, got {room!r}")
    if getattr(press, "pooled", False):     # AdaKV pools an empty per-head cache of n_kept + room
        per_head = -(-max(layer_budgets(press, cfg, context_len)) // cfg.num_kv_heads)
        return dense_cache(cfg, batch_size, per_head + room, dtype=dtype, kind=kind, hybrid=False)
    sizes = [b + room for b in layer_budgets(press, cfg, context_len)]
    return pressed_cache(cfg, batch_size, sizes, dtype, kind)


def cache_bytes(cfg: ModelConfig, batch_size: int, layer_slots, dtype=None, kind: str = "dense",
                hybrid: bool = False) -> int:
    """Exact bytes of `pressed_cache(cfg, batch_size, layer_slots, ..., hybrid=hybrid)`, without
    allocating."""
    one = cfg.replace(num_layers=1, layer_types=None)          # each layer alone, never a ring
    rings = _pressed_rings(cfg, layer_slots, hybrid)
    per_head = batch_size * cfg.num_kv_heads * 4
    per_layer = [(dense_bytes(one, batch_size, int(r or s), dtype, kind, hybrid=False) - 4 * batch_size
                  + per_head * (1 if r else int(s) + 1)) for s, r in zip(layer_slots, rings)]
    ring_pos = batch_size * max(rings) * 4 if any(rings) else 0     # a hybrid cache's slot_pos [B, W]
    return sum(per_layer) + ring_pos + 4 * batch_size


def _pressed_rings(cfg: ModelConfig, layer_slots, hybrid: bool) -> tuple:
    """Per-layer ring sizes of `pressed_cache` (all 0 unless hybrid), after checking layer_slots."""
    if len(layer_slots) != cfg.num_layers or any(int(s) < 1 for s in layer_slots):
        raise ValueError(f"layer_slots must give {cfg.num_layers} positive slot counts, got {list(layer_slots)}")
    if not hybrid:
        return (0,) * cfg.num_layers
    rings = tuple(cfg.layer_window(i) or 0 for i in range(cfg.num_layers))
    full = {int(s) for s, r in zip(layer_slots, rings) if not r}
    if not any(rings) or all(rings):
        raise ValueError(f"hybrid=True: a hybrid pressed cache needs windowed and full layers; "
                         f"{cfg.name!r} has windows {[cfg.layer_window(i) for i in range(cfg.num_layers)]}")
    if len(full) != 1:
        raise ValueError(f"hybrid=True: the full layers of a hybrid cache share one slot count (its "
                         f"max_len); layer_slots gives them {sorted(full)} (use the largest)")
    return rings


def pressed_cache(cfg: ModelConfig, batch_size: int, layer_slots, dtype=None, kind: str = "dense",
                  hybrid: bool = False) -> KVCache:
    """An empty pressed cache with `layer_slots[l]` slots in layer l.

    hybrid=True (a model with windowed and full layers, e.g. Gemma 2/3): each windowed layer is
    a ring of its window (its layer_slots entry is ignored: a press leaves rings as they are)
    and the full layers hold layer_slots (one count for all of them), as a press leaves a
    hybrid cache; a press on it compacts only the full layers."""
    rings = _pressed_rings(cfg, layer_slots, hybrid)
    # each layer alone (a one-layer model, never a ring): a whole-model cache per layer would
    # allocate L times the cache (11.7 GB for SmolLM2's 30 layers, 2 rows of 4k slots)
    one = cfg.replace(num_layers=1, layer_types=None)
    per = [dense_cache(one, batch_size, int(r or s), dtype=dtype, kind=kind, hybrid=False)
           for s, r in zip(layer_slots, rings)]
    B, K = batch_size, cfg.num_kv_heads
    pick = lambda name: tuple(getattr(c, name)[0] for c in per)  # noqa: E731
    return per[0].replace(
        keys=pick("keys"), values=pick("values"),
        key_scales=pick("key_scales") if kind == "int8" else (),
        value_scales=pick("value_scales") if kind == "int8" else (),
        head_pos=tuple(jnp.full((B, K, 0 if r else int(s)), -1, jnp.int32) for s, r in zip(layer_slots, rings)),
        head_fill=tuple(jnp.zeros((B, K), jnp.int32) for _ in layer_slots),
        slot_pos=jnp.full((B, max(rings)), -1, jnp.int32) if any(rings) else None,
        rings=rings if any(rings) else ())
