"""Attention: one module for full-sequence, chunked prefill and single-token decode.

Axis letters: B batch, T query chunk, S key slots, D model, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim.

Keys come in blocks that share one softmax. Without a cache: the chunk's own keys. With a
cache, normally: write the chunk into the cache first, then attend over the whole buffer
(one block; the read depends on the write, so XLA updates the donated buffer in place).
A ring (window/sinks) taking a chunk of several tokens is the exception: a later token
of the chunk may overwrite a slot an earlier query still needs, so those queries attend
over the cache as it was (old block) plus the chunk's own keys (new block), and the
chunk is written afterwards. XLA then copies that layer's buffers once per such chunk
(prefill only; a one-token decode step never needs it: the slot it overwrites is just
outside the window of its query).

Masks, scores and the blockwise softmax live in kvjax/attention_math.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention_math import attention_mask, score_args, scores, softmax_blocks
from .cache import KVCache, kivi, layer_arrays, read_layer, slot_positions, write_layer
from .config import ModelConfig
from .cache.paged import paged_attention
from .layers import Norm, apply_rope, apply_rope_heads_first, chunk_rope, dense

def attention_pattern(cfg: ModelConfig, cache: KVCache | None, layer: int = 0):
    """(window, sinks) a query of `layer` sees, from the model and the cache kind.

    A ring of W slots shows at most the last W tokens, so it narrows the model's own window.
    """
    window = cfg.layer_window(layer)
    sinks = cfg.attention_sinks if window is not None else 0
    if cache is not None and cache.kind in ("window", "sinks"):
        ring = cache.max_len - cache.num_sinks
        window = ring if window is None else min(window, ring)
        sinks = cache.num_sinks
    return window, sinks


class Attention(nn.Module):
    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x, positions, lengths, cache: KVCache | None = None, layer: int = 0,
                 starts=None, slots=None, live: int | None = None, press=None, budget=None):
        """x: [B, T, D]; positions: int32 [B, T]; lengths: int32 [B] real tokens of the chunk.

        cache: None (no cache) or the KVCache before this chunk; `layer` picks its buffers;
        starts: int32 [B] first position of the chunk per row; slots: int32 [B, T] where
        the chunk is written (cache.chunk_slots); live (static): read only slots [0, live),
        which must hold every row's tokens (dense/int8; the caller plans it). press (static)
        and budget (this layer's traced budgets): compact the chunk into a pressed cache
        (kvjax/press/). Returns ([B, T, D], this layer's new cache arrays or None).
        """
        c = self.cfg
        B, T, _ = x.shape
        q = dense(c, c.num_heads * c.head_dim, "q", c.qkv_bias, self.std)(x)
        k = dense(c, c.num_kv_heads * c.head_dim, "k", c.qkv_bias, self.std)(x)
        v = dense(c, c.num_kv_heads * c.head_dim, "v", c.qkv_bias, self.std)(x)
        if c.qk_norm == "proj":   # OLMo 2: over the whole projection width, before the head split
            q, k = Norm(c, name="q_norm")(q), Norm(c, name="k_norm")(k)
        q = q.reshape(B, T, c.num_heads, c.head_dim)
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":   # Qwen3, Gemma 3: per head over head_dim, before rotary
            q, k = Norm(c, name="q_norm")(q), Norm(c, name="k_norm")(k)
        window, sinks = attention_pattern(c, cache, layer)
        rotary = c.positions == "rotary"
        cache_positions = rotary and sinks > 0   # StreamingLLM: rotate at attention time
        q_pre, inv_freq = q, None
        if rotary:   # this layer's table (Gemma 3: local/global bases; Phi-3: longrope per row)
            inv_freq, rope_scale = chunk_rope(c, layer, positions, lengths)
        if rotary and not cache_positions:
            q = apply_rope(q, positions, inv_freq, rope_scale)
            k = apply_rope(k, positions, inv_freq, rope_scale)   # keys are cached after rotation
        if cache is not None and cache.kind == "paged":   # kvjax.Engine: pages of a shared pool
            out, new_layer = paged_attention(q, k, v, positions, lengths, cache, layer, window, sinks,
                                             lambda qs, kb: scores(qs, kb, *score_args(c)))
            return dense(c, c.d_model, "o", c.out_bias, self.std)(out.reshape(B, T, -1)), new_layer
        if cache is not None and cache.pressed:
            return _pressed(self, x, q_pre, q, k, v, positions, lengths, cache, layer, window, sinks,
                            inv_freq, press, budget)

        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        # Blocks of (keys [B,K,S,H], values, positions [B,S], valid [B,S]).
        chunk = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, t < lengths[:, None])
        new_layer = None
        lc, li = cache, layer                    # the cache and layer index the buffers are read by
        if cache is not None and cache.hybrid:   # this layer alone: a ring or a full buffer
            ring = cache.rings[layer] > 0
            lc, li, slots = cache.layer_view(layer), 0, slots[1 if ring else 0]
            live = None if ring else live
        if lc is None:
            blocks, starts = [chunk], jnp.zeros((B,), jnp.int32)
        elif lc.kind == "kivi":
            blocks, new_layer = _kivi_blocks(lc, li, k, v, starts, lengths, chunk)
        elif lc.slot_pos is not None and T > 1:   # ring + several tokens: old block + chunk
            old = read_layer(lc.kind, layer_arrays(lc, li), k.dtype)
            blocks = [(*old, *slot_positions(lc, starts)), chunk]
            new_layer = write_layer(lc, li, k, v, slots)
        else:                                      # write, then read back in place
            new_layer = write_layer(lc, li, k, v, slots)
            pos, valid = slot_positions(lc, starts, lengths, slots)
            view = new_layer
            if live is not None and live < lc.max_len:   # skip slots no row has reached
                view = {name: a[:, :, :live] for name, a in new_layer.items()}
                pos, valid = pos[:, :live], valid[:, :live]
            blocks = [(*read_layer(lc.kind, view, k.dtype), pos, valid)]

        if cache_positions:
            score = _sink_scorer(c, q, positions, starts, window, sinks, inv_freq, rope_scale)
        else:
            score = lambda kb, kp: scores(q, kb, *score_args(c))  # noqa: E731
        out = softmax_blocks(
            [(score(kb, kp), attention_mask(positions, kp, kv, window, sinks), vb)
             for kb, vb, kp, kv in blocks], q.dtype)
        out = dense(c, c.d_model, "o", c.out_bias, self.std)(out.reshape(B, T, -1))
        return out, new_layer


def _sink_scorer(c: ModelConfig, q, positions, starts, window, sinks, inv_freq, rope_scale=1.0):
    """Scores with StreamingLLM cache positions, for keys stored unrotated.

    Once tokens have been evicted, the cache holds `sinks` first tokens and the last
    `window` ones, placed at cache positions 0..sinks+window-1: the query at position p
    sits at p - e(p), where e(p) = max(0, p - (sinks + window - 1)) tokens were evicted.
    So a window key j is at distance p - j (its absolute distance) and a sink key at
    p - e(p) - j. Rotary scores depend only on that distance, so window scores rotate
    query and keys by a per-row reference e(start) (keeping angles small however long
    the stream), and sink scores rotate the query by p - e(p) and sink keys by j.
    """
    evicted = lambda p: jnp.maximum(p - (sinks + window - 1), 0)  # noqa: E731
    ref = evicted(starts)[:, None]                                          # [B, 1]
    q_window = apply_rope(q, positions - ref, inv_freq, rope_scale)
    q_sink = apply_rope(q, positions - evicted(positions), inv_freq, rope_scale)

    def score(keys, k_pos):
        window_scores = scores(q_window, apply_rope_heads_first(keys, k_pos - ref, inv_freq, rope_scale),
                               *score_args(c))
        sink_scores = scores(q_sink, apply_rope_heads_first(keys, k_pos, inv_freq, rope_scale),
                             *score_args(c))
        return jnp.where((k_pos < sinks)[:, None, None, None, :], sink_scores, window_scores)

    return score

def _pressed(self, x, q_pre, q, k, v, positions, lengths, cache, layer, window, sinks, inv_freq,
             press, budget):
    """Attention over a pressed cache (per-head slot positions), appending the chunk's kept
    tokens (kvjax/press/layer.py). One token without a press: write, then read in place.
    Otherwise the chunk attends over the old cache plus all of its own tokens, then its
    kept tokens are written (a press sees the whole chunk first, as in kvpress)."""
    from .press.base import LayerInputs
    from .press.layer import chunk_keep, write_chunk

    c = self.cfg
    B, T = positions.shape
    valid = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    if press is None and T == 1:
        new_layer = write_chunk(cache, layer, k, v, positions,
                                chunk_keep(None, _keep_inputs(k, lengths)))
        kb, vb = read_layer(cache.kind, new_layer, k.dtype)
        block = _cache_block(c, q, kb, vb, new_layer["pos"], new_layer.get("owner"), positions, window, sinks)
        out = softmax_blocks([block], q.dtype)
        return dense(c, c.d_model, "o", c.out_bias, self.std)(out.reshape(B, T, -1)), new_layer
    kb, vb = read_layer(cache.kind, layer_arrays(cache, layer), k.dtype)
    owner = cache.head_owner[layer] if cache.pooled else None
    chunk_k, chunk_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = [_cache_block(c, q, kb, vb, cache.head_pos[layer], owner, positions, window, sinks),
              (scores(q, chunk_k, *score_args(c)), attention_mask(positions, positions, valid, window, sinks),
               chunk_v)]
    need_sums = press is not None and press.needs_attention
    res = softmax_blocks(blocks, q.dtype, column_sums=need_sums, query_valid=valid)
    out, sums = res if need_sums else (res, None)
    o = dense(c, c.d_model, "o", c.out_bias, self.std)
    out = o(out.reshape(B, T, -1))
    inp = LayerInputs(cfg=c, layer=layer, x=x, q=q_pre, q_rot=q, k=k, v=v, positions=positions,
                      lengths=lengths, inv_freq=inv_freq, o_kernel=o.variables["params"]["kernel"],
                      attn_sums=sums[1] if need_sums else None, budget=budget or {})
    return out, write_chunk(cache, layer, k, v, positions, chunk_keep(press, inp))


def _cache_block(c, q, kb, vb, pos, owner, positions, window, sinks):
    """(scores, mask, values) of a pressed cache's slots. Per-head slots: pos [B, K, S]. A pool
    (owner [B, P]): keys [B, 1, P, H] scored once by every query head, each slot masked to
    its owner's query heads."""
    mask = attention_mask(positions, pos, pos >= 0, window, sinks)           # [B, K or 1, T, S]
    if owner is None:
        return scores(q, kb, *score_args(c)), mask, vb
    B, T, N, _ = q.shape
    K = c.num_kv_heads
    s = scores(q, kb, *score_args(c)).reshape(B, K, N // K, T, -1)                            # [B, K, G, T, P]
    own = owner[:, None, :] == jnp.arange(K, dtype=jnp.int32)[None, :, None]  # [B, K, P]
    mask = mask[:, :, None] & own[:, :, None, None, :]                        # [B, K, 1, T, P]
    return s, mask, jnp.broadcast_to(vb, (B, K, *vb.shape[2:]))


def _keep_inputs(k, lengths):
    """The few LayerInputs fields `chunk_keep(None, ...)` reads."""
    from .press.base import LayerInputs
    return LayerInputs(cfg=None, layer=0, x=None, q=None, q_rot=None, k=k, v=None, positions=None,
                       lengths=lengths, inv_freq=None, o_kernel=None, attn_sums=None, budget={})


def _kivi_blocks(cache, layer, k, v, starts, lengths, chunk):
    """KIVI: one token is written, then read back with the store (as the dense path); a chunk
    attends over the stored tokens plus its own exact keys and values, then is written
    (its queries see full precision, as KIVI's prefill does)."""
    quant = cache.quant
    arrays = layer_arrays(cache, layer)
    new_layer = kivi.write(arrays, k, v, starts, lengths, *quant)
    if k.shape[1] == 1:
        kr, vr, pos, valid = kivi.read(new_layer, starts + lengths, k.dtype, *quant)
        return [(kr, vr, pos, valid)], new_layer
    kr, vr, pos, valid = kivi.read(arrays, starts, k.dtype, *quant)
    return [(kr, vr, pos, valid), chunk], new_layer
