"""KVzip's prefill (kvjax.press.KVzipPress): the context once, then reconstruction passes of the
whole model that score every (token, kv head) pair, then one global selection.

Axis letters: B batch, T context width, K kv heads, L layers, H head dim, R reconstruction width.

The press (kvjax/press/kvzip.py) owns its settings, the chunk plan and the scoring hook;
this module runs the model, so it lives with the decode programs: `kvjax.prefill(...,
press=KVzipPress(...))` checks the host inputs here, then runs `kvzip_program`, one jit.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding, validate
from ..cache import as_pooled, assemble_pressed, layer_arrays, mesh_of, read_layer
from ..cache.attend import CacheWrite
from ..cache.pressed import Keep, write_chunk
from ..model import Transformer
from ..press import host, pressed_cache
from ..press.base import top_per_head
from ..press.kvzip import ChunkScorer, KVzipPress, chunk_plan, pool_slots, rep_tokens
from .programs import append_chunk


def prefill(press: KVzipPress, cfg, params, tokens: np.ndarray, lens: np.ndarray, cache):
    """kvjax.prefill's path for this press: host checks, then one jitted program."""
    where = "prefill (KVzipPress)"
    host.check_press(press, cfg, cache, mesh_of(cache), "prefill")
    if mesh_of(cache) is not None:
        raise ValueError(f"{where}: a cache on a mesh is not supported yet; prefill without a mesh")
    if cache.hybrid or (sharding.to_host(cache.lengths) > 0).any() or (
            cache.pressed and any((sharding.to_host(f) > 0).any() for f in cache.head_fill)):
        raise ValueError(f"{where}: KVzip scores a context reconstructed from an EMPTY cache "
                         f"(init_cache(..., hybrid=False)); this cache is "
                         f"{'hybrid' if cache.hybrid else 'not empty'}")
    p = press.prefix_length
    if (lens <= p).any():
        b = int(np.argmax(lens <= p))
        raise ValueError(f"{where}: row {b} has {int(lens[b])} tokens but the chat template prefix "
                         f"alone is prefix_length={p}; a context needs content after it")
    T = tokens.shape[1]
    plan = chunk_plan(T, p, press.chunk_size, len(press.repeat_ids), len(press.repeat_part_ids),
                       len(press.suffix_ids))
    rep_len = max(w for _, w, _ in plan)
    validate.check_room(cfg, np.zeros_like(lens), lens + rep_len, 1 << 62, where, bounded=False)
    K, L = cfg.num_kv_heads, cfg.num_layers
    pools = np.array([pool_slots(cache, l) for l in range(L)], np.int64)     # pool of each layer
    n = lens.astype(np.int64)
    r = press.compression_ratio
    if press.layerwise:
        keep = K * n - np.array([int(K * int(x) * r) for x in n], np.int64)
        if (keep > pools.min()).any():
            b = int(np.argmax(keep > pools.min()))
            raise ValueError(f"{where}: row {b} keeps {int(keep[b])} (token, head) pairs per layer but the "
                             f"cache pools {int(pools.min())} in layer {int(np.argmin(pools))} (num_kv_heads "
                             f"{K} x max_len {int(pools.min()) // K}); use max_len >= {-(-int(keep[b]) // K)}")
    else:
        keep = L * K * n - np.array([int(L * K * int(x) * r) for x in n], np.int64)
        room = np.minimum(pools[:, None], K * n[None, :]).sum(0)
        if (keep > room).any():
            b = int(np.argmax(keep > room))
            raise ValueError(f"{where}: row {b} keeps {int(keep[b])} (token, head) pairs over {L} layers "
                             f"but the cache's pools hold {int(room[b])} of them (num_kv_heads {K} x "
                             f"max_len {int(pools.max()) // K} per layer); use max_len >= "
                             f"{-(-int(keep[b]) // (L * K))}")
    return kvzip_program(cfg, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lens, jnp.int32), cache,
                      press.static(), jnp.asarray(keep, jnp.int32))


@partial(jax.jit, static_argnums=(0, 5), donate_argnums=(4,))
def kvzip_program(cfg, params, tokens, lengths, cache, press: KVzipPress, keep):
    B, T = tokens.shape
    L, K = cfg.num_layers, cfg.num_kv_heads
    dtype = cache.keys[0].dtype if cache.kind != "int8" else None
    # made inside the program, the scratch's empty slot positions (-1) are constants: XLA would
    # know the context's cache block is all masked and constant-fold it in every layer
    scratch = jax.lax.optimization_barrier(pressed_cache(cfg, B, [T] * L, dtype, cache.kind))
    logits, full = append_chunk(cfg, params, tokens, lengths, scratch)         # keeps every token
    kv_dtype = jnp.dtype(cfg.dtype)
    ctx = [read_layer(full.kind, layer_arrays(full, l), kv_dtype) for l in range(L)]

    scores = [jnp.zeros((B, K, T), jnp.float32) for _ in range(L)]
    plan = chunk_plan(T, press.prefix_length, press.chunk_size, len(press.repeat_ids),
                       len(press.repeat_part_ids), len(press.suffix_ids))
    for i, (start, rep_width, width) in enumerate(plan):
        rep, rep_len, chunk_len = rep_tokens(press, tokens, lengths, start, rep_width, width, i == 0)
        scorer = ChunkScorer(press, ctx, start, width, chunk_len, min(press.n_sink, start))
        positions = lengths[:, None] + jnp.arange(rep_width, dtype=jnp.int32)[None, :]
        Transformer(cfg).apply({"params": params}, rep, positions, rep_len, full,
                               CacheWrite(lengths, press=scorer), logits_at=jnp.maximum(rep_len - 1, 0))
        assert len(scorer.out) == L, "the reconstruction pass did not reach every layer"
        cols = start + jnp.arange(width)
        for l in range(L):
            fresh = (jnp.arange(width)[None, :] < chunk_len[:, None])[:, None, :]              # [B, 1, w]
            scores[l] = scores[l].at[:, :, cols].set(jnp.where(fresh, scorer.out[l], scores[l][:, :, cols]))

    t = jnp.arange(T)
    valid = t[None, :] < lengths[:, None]                                                   # [B, T]
    stacked = jnp.stack(scores)                                                             # [L, B, K, T]
    top = jnp.max(jnp.where(valid[None, :, None, :], stacked, -jnp.inf), axis=(0, 2, 3))     # [B]
    sinks = (t[None, :] < press.n_sink) & valid
    stacked = jnp.where(sinks[None, :, None, :], top[None, :, None, None] + 1.0, stacked)
    valid_flat = jnp.broadcast_to(valid[:, None, :], (B, K, T)).reshape(B, K * T)

    out = as_pooled(cache)
    if press.layerwise:
        masks = [top_per_head(stacked[l].reshape(B, 1, K * T), valid_flat, keep)[:, 0] for l in range(L)]
    else:
        # each layer's best `pool` pairs, then the row's best `keep` among those (kvpress's global
        # selection whenever no layer's share exceeds its pool)
        capped = [top_per_head(stacked[l].reshape(B, 1, K * T), valid_flat,
                               jnp.full((B,), out.layer_slots(l), jnp.int32))[:, 0] for l in range(L)]
        flat = jnp.concatenate([stacked[l].reshape(B, K * T) for l in range(L)], axis=1)[:, None]
        ok = jnp.concatenate(capped, axis=1)
        chosen = top_per_head(flat, ok, keep)[:, 0]                                        # [B, L*K*T]
        masks = [chosen[:, l * K * T:(l + 1) * K * T] for l in range(L)]

    layers, pos, fill = [], [], []
    positions = jnp.broadcast_to(t[None, :].astype(jnp.int32), (B, T))
    for l in range(L):
        k, v = (jnp.swapaxes(a, 1, 2) for a in ctx[l])                                    # [B, T, K, H]
        arrays = write_chunk(out, l, k, v, positions, Keep(masks[l].reshape(B, K, T)))
        layers.append(arrays)
        pos.append(arrays["pos"])
        fill.append(arrays["fill"])
    return logits, assemble_pressed(out, layers, pos, fill, lengths)
