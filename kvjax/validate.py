"""Host-side input checks, run before anything is traced or donated.

Every error names the offending value and the limit, so a bad prompt never reaches XLA
(where it would wrap, clip or produce NaN silently) and a donated cache is never
consumed by a call that then fails.
"""
from __future__ import annotations

import numpy as np

from .cache import KVCache
from .config import ModelConfig


def as_tokens(tokens, name: str = "tokens") -> np.ndarray:
    """A 2-D integer array [B, T] on the host."""
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    return arr


def as_lengths(lengths, tokens: np.ndarray, name: str = "lengths") -> np.ndarray:
    """Per-row real lengths [B] with 1 <= length <= padded width; None means full rows."""
    B, T = tokens.shape
    if lengths is None:
        return np.full((B,), T, np.int32)
    arr = np.asarray(lengths)
    if arr.shape != (B,):
        raise ValueError(f"{name} must have shape [{B}] (one per row of the tokens), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if (arr < 1).any():
        b = int(np.argmax(arr < 1))
        raise ValueError(f"{name}[{b}]={int(arr[b])}: every row needs at least one token")
    if (arr > T).any():
        b = int(np.argmax(arr > T))
        raise ValueError(f"{name}[{b}]={int(arr[b])} is larger than the padded width {T} of the tokens")
    return arr.astype(np.int32)


def check_token_ids(cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray, name: str = "tokens"):
    """Real tokens (t < lengths[b]) must lie in [0, vocab_size); padding is not checked."""
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    bad = real & ((tokens < 0) | (tokens >= cfg.vocab_size))
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{name}[{b}, {t}]={int(tokens[b, t])} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")


def check_room(cfg: ModelConfig, used: np.ndarray, adding: np.ndarray, max_len: int, what: str,
               bounded: bool = True):
    """used[b] + adding[b] tokens must fit in the cache (when `bounded`: dense and int8 kinds;
    window and sinks caches run on past max_len) and in the model's learned position table."""
    total = used + adding
    if bounded and (total > max_len).any():
        b = int(np.argmax(total > max_len))
        raise ValueError(f"{what}: row {b} needs {int(total[b])} cache slots ({int(used[b])} "
                         f"already used + {int(adding[b])} new) but max_len is {max_len}")
    if cfg.positions == "learned" and (total > cfg.max_position).any():
        b = int(np.argmax(total > cfg.max_position))
        raise ValueError(f"{what}: row {b} reaches position {int(total[b])} but the model's learned "
                         f"position table has max_position={cfg.max_position}")


def check_cache(cfg: ModelConfig, cache, batch_size: int):
    """The cache must belong to this model shape and batch."""
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a kvjax.KVCache, got {type(cache).__name__}")
    if any(getattr(x, "is_deleted", lambda: False)() for x in (cache.lengths, *cache.keys)):
        raise ValueError("this cache was donated to an earlier prefill/decode_step/generate call "
                         "and its buffers are gone; pass the cache that call returned")
    if len(cache.keys) != cfg.num_layers:
        raise ValueError(f"cache has {len(cache.keys)} layers but the model has {cfg.num_layers}")
    for layer in range(cfg.num_layers):
        slots = cache.keys[layer].shape[2]
        if cache.hybrid and slots != (cache.rings[layer] or cache.max_len):
            raise ValueError(f"hybrid cache layer {layer} has {slots} slots but its ring size is "
                             f"{cache.rings[layer]} (0: a full layer of max_len={cache.max_len})")
        want = (cache.batch_size, 1 if cache.pooled else cfg.num_kv_heads, slots, cfg.head_dim)
        have = (*cache.keys[layer].shape[:3], cache.head_dim)
        if have != want:
            raise ValueError(f"cache buffers of layer {layer} have shape {have} but this model needs "
                             f"[B, num_kv_heads, slots, head_dim] = {want}")
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    if cache.hybrid and any(r and (w is None or r < w) for r, w in zip(cache.rings, windows)):
        raise ValueError(f"this hybrid cache has rings {cache.rings} but the model's windows are "
                         f"{[cfg.layer_window(i) for i in range(cfg.num_layers)]}")
    if cache.batch_size != batch_size:
        raise ValueError(f"cache batch size {cache.batch_size} does not match the tokens' batch size {batch_size}")
