"""Host-side checks and budgets for pressed prefill, decode and generate: everything is
validated before anything is donated, and errors name the value and the limit.

Axis letters: B batch, K kv heads, L layers.
"""
from __future__ import annotations

import numpy as np

from ..cache import KVCache, used_slots
from ..config import ModelConfig
from .base import Press
from .decoding import DecodingPress

PRESSABLE_KINDS = ("dense", "int8")


def check_press(press, cfg: ModelConfig, cache: KVCache, mesh, where: str) -> None:
    if not isinstance(press, Press):
        raise ValueError(f"{where}: press must be a kvjax.press press (e.g. SnapKVPress), got "
                         f"{type(press).__name__}")
    if cache.kind not in PRESSABLE_KINDS:
        raise ValueError(f"{where}: a press compacts dense or int8 caches; this cache is kind "
                         f"{cache.kind!r} (a ring already decides what it keeps)")
    if cache.hybrid:
        check_hybrid(press, cache, mesh, where)
    if cfg.attention_sinks:
        raise ValueError(f"{where}: presses are not supported on models with attention_sinks="
                         f"{cfg.attention_sinks} (keys are cached unrotated there)")
    if isinstance(press, DecodingPress) and cache.pooled:
        raise ValueError(f"{where}: DecodingPress cannot compact a pooled (AdaKVPress) cache")
    if isinstance(press, DecodingPress) and where.startswith("prefill"):
        raise ValueError("prefill: DecodingPress compresses during generation; pass it to "
                         "kvjax.generate(..., press=DecodingPress(...))")
    press.check_model(cfg)


def check_hybrid(press, cache: KVCache, mesh, where: str) -> None:
    """A press on a hybrid cache compacts its full layers and leaves its rings (each already
    holds only its layer's window) as they are; refuse what that cannot do, saying what to do."""
    name, ring = type(press).__name__, max(cache.rings)
    full = ("; make the cache with init_cache(..., hybrid=False) to press every layer "
            "(max_len slots on every layer)")
    if cache.all_rings:
        raise ValueError(f"{where}: this hybrid cache keeps rings of {ring} slots on every layer (the "
                         f"model is windowed everywhere), so there is no full layer to press{full}")
    if getattr(press, "whole_model", False):
        raise ValueError(f"{where}: {name} scores a context by reconstructing it through every layer "
                         f"and keeps (layer, head, token) triples in pooled layers; it is not done on "
                         f"hybrid caches, whose windowed layers are rings of {ring} slots{full}")
    if isinstance(press, DecodingPress):
        raise ValueError(f"{where}: {name} cuts every layer's whole cache to target_size during "
                         f"generation; it is not done on hybrid caches, whose windowed layers are rings "
                         f"of {ring} slots that already stay bounded{full}")
    if getattr(press, "pooled", False):
        raise ValueError(f"{where}: {name} pools each layer's kv heads into one pool of slots; on a hybrid "
                         f"cache it is not supported yet (its windowed layers are rings of {ring} slots "
                         f"per kv head). Press this hybrid cache with a per-head press (e.g. {name}'s "
                         f"inner press, {type(press.press).__name__}){full}")
    if type(press).__name__ == "KeyRerotationPress":
        raise ValueError(f"{where}: {name} moves the next position back to n_kept, but the windowed "
                         f"layers' rings hold their last {ring} tokens at their original positions (a "
                         f"query must see them at distance < {ring}); press this hybrid cache with "
                         f"the inner press ({type(press.press).__name__}) alone{full}")
    if mesh is not None:
        raise ValueError(f"{where}: presses on a hybrid cache on a mesh are not done yet; prefill "
                         f"without a mesh{full}")


def fills(cache: KVCache) -> np.ndarray:
    """int [L, B]: slots used per layer and row (the fullest kv head; a hybrid cache's ring
    layers: 0, they never run out)."""
    used = np.array(used_slots(cache))
    if cache.hybrid:
        used[np.array(cache.rings) > 0] = 0
    return used


def slots(cache: KVCache) -> np.ndarray:
    return np.array([cache.layer_slots(layer) for layer in range(len(cache.keys))])


def _rings(cache: KVCache) -> np.ndarray:
    """bool [L]: layers that are rings (a ring takes any number of tokens; only full layers fill)."""
    return np.array(cache.rings, dtype=bool) if cache.hybrid else np.zeros(len(cache.keys), bool)


def per_token(cfg: ModelConfig, cache: KVCache) -> int:
    """Slots one appended token takes in each layer: one per kv head in a pool, else one."""
    return cfg.num_kv_heads if cache.pooled else 1


def check_room(cache: KVCache, adding: np.ndarray, what: str, scale: int = 1) -> None:
    """adding: int [L, B] (or [B]) slots each row takes per layer; raises naming row, layer, limit.
    scale: the layer's slots count `scale` times (a dense cache about to become a pool)."""
    used = fills(cache)
    add = np.broadcast_to(np.asarray(adding), used.shape)
    total, limit = used + add, scale * slots(cache)[:, None]
    over = (total > limit) & ~_rings(cache)[:, None]
    if over.any():
        layer, b = map(int, np.argwhere(over)[0])
        kind = " (a full layer of this hybrid cache; its rings keep only their window)" if cache.hybrid else ""
        raise ValueError(f"{what}: row {b} needs {int(total[layer, b])} slots in layer {layer} "
                         f"({int(used[layer, b])} used + {int(add[layer, b])} new) but that layer "
                         f"has {int(limit[layer, 0])} slots (max_len){kind}")


def prefill_budgets(press: Press, cfg: ModelConfig, cache: KVCache, lens: np.ndarray, what: str) -> dict:
    """Budgets (int32 arrays [L, B, ...]) after checking the press can score these rows and the
    cache has room for what it keeps."""
    press.check_lengths(lens)
    budgets = {k: np.ascontiguousarray(v, np.int32) for k, v in press.host_budgets(lens, cfg).items()}
    bound = press.kept_bound(lens, cfg)
    if getattr(press, "pooled", False):
        if not cache.pooled and (cache.pressed or (fills(cache) > 0).any()):
            raise ValueError(f"{what}: {type(press).__name__} pools the kv heads' slots of an EMPTY cache "
                             f"(or one it pooled before); this cache already holds tokens")
        check_room(cache, bound, what, scale=1 if cache.pooled else cfg.num_kv_heads)
    else:
        if cache.pooled:
            raise ValueError(f"{what}: this cache pools its kv heads' slots (AdaKVPress); only AdaKVPress "
                             f"or no press can add to it")
        check_room(cache, bound, what)
    return budgets


def check_decoding_room(cache: KVCache, press, lens: np.ndarray, segments, prompt_compress: bool,
                        what: str) -> None:
    """Simulate the largest fill a DecodingPress generation reaches between compactions."""
    used = fills(cache) + np.asarray(lens)[None, :]
    limit = slots(cache)[:, None]
    peak = used.copy()
    if prompt_compress:
        used = np.minimum(used, press.target_size)
    for steps, _, compress, repeat in segments:
        for _ in range(min(repeat, 2)):        # after the first period every period is alike
            peak = np.maximum(peak, used + steps)
            used = np.minimum(used + steps, press.target_size) if compress else used + steps
    over = (peak > limit) & ~_rings(cache)[:, None]
    if over.any():
        layer, b = map(int, np.argwhere(over)[0])
        raise ValueError(f"{what}: row {b} reaches {int(peak[layer, b])} slots in layer {layer} between "
                         f"compressions (target_size={press.target_size} + compression_interval="
                         f"{press.compression_interval}, after the prompt) but the cache has "
                         f"{int(limit[layer, 0])} slots (max_len)")
