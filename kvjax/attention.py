"""Attention: one Flax module for full-sequence, chunked prefill and single-token decode.

Axis letters: B batch, T query chunk, S key slots, D model, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim.

This module owns the projections, the per-head norms and rotary; what the keys are read
from and where the chunk is written belongs to the cache's layout (kvjax/cache/attend.py,
one dispatch for dense, int8, rings, hybrid, KIVI, pressed and paged storage). Masks,
scores and the blockwise softmax live in kvjax/attention_math.py.

Sinks caches store keys *before* rotation; their scores rotate queries and keys by place in
the cache (`_sink_scorer`), as the StreamingLLM paper found necessary for stable perplexity.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .attention_math import score_args, scores
from .cache import KVCache
from .cache.attend import CacheWrite, LayerChunk, attend
from .config import ModelConfig
from .layers import Norm, apply_rope, apply_rope_heads_first, chunk_rope, dense
from .press.base import LayerInputs


def attention_pattern(cfg: ModelConfig, cache: KVCache | None, layer: int = 0):
    """(window, sinks) a query of `layer` sees, from the model and the cache kind.

    A ring of W slots shows at most the last W tokens, so it narrows the model's own window.
    """
    window = cfg.layer_window(layer)
    sinks = cfg.attention_sinks if window is not None else 0
    if cache is not None and cache.kind in ("window", "sinks"):
        ring = cache.max_len - cache.num_sinks - cache.slack     # slack slots: not in the window
        window = ring if window is None else min(window, ring)
        sinks = cache.num_sinks
    return window, sinks


class Attention(nn.Module):
    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self, x, positions, lengths, cache: KVCache | None = None, layer: int = 0,
                 write: CacheWrite | None = None):
        """x: [B, T, D]; positions: int32 [B, T]; lengths: int32 [B] real tokens of the chunk.

        cache: None (no cache) or the KVCache before this chunk; `layer` picks its buffers;
        write: what the cache write needs (starts, slots, live, press, budgets; see
        kvjax/cache/attend.py). Returns ([B, T, D], this layer's new cache arrays or None).
        """
        c = self.cfg
        B, T, _ = x.shape
        q_pre, k, v = self._project(x)
        window, sinks = attention_pattern(c, cache, layer)
        rotary = c.positions == "rotary"
        cache_positions = rotary and sinks > 0   # StreamingLLM: rotate at attention time
        q, inv_freq, rope_scale = q_pre, None, 1.0
        if rotary:   # this layer's table (Gemma 3: local/global bases; Phi-3: longrope per row)
            inv_freq, rope_scale = chunk_rope(c, layer, positions, lengths)
        if rotary and not cache_positions:
            q = apply_rope(q_pre, positions, inv_freq, rope_scale)
            k = apply_rope(k, positions, inv_freq, rope_scale)   # keys are cached after rotation
        plain = lambda qs, kb: scores(qs, kb, *score_args(c))  # noqa: E731
        if cache_positions:
            starts = write.starts if write is not None else jnp.zeros((B,), jnp.int32)
            score = _sink_scorer(c, q, positions, starts, window, sinks, inv_freq, rope_scale)
        else:
            score = lambda kb, kp: plain(q, kb)  # noqa: E731
        press_keep = None
        if write is not None and write.press is not None:
            def press_keep(sums):   # the press's decision, from what this layer saw
                inp = LayerInputs(cfg=c, layer=layer, x=x, q=q_pre, q_rot=q, k=k, v=v, positions=positions,
                                  lengths=lengths, inv_freq=inv_freq,
                                  o_kernel=self.variables["params"]["o"]["kernel"], attn_sums=sums,
                                  budget=write.layer_budget(layer))
                return write.press.keep(inp)
        chunk = LayerChunk(q, k, v, positions, lengths, layer, window, sinks, score, plain, press_keep,
                           score_args(c))
        out, new_layer = attend(chunk, cache, write)
        return dense(c, c.d_model, "o", c.out_bias, self.std)(out.reshape(B, T, -1)), new_layer

    def _project(self, x):
        """(q [B, T, N, H], k, v [B, T, K, H]) before rotary, per-head norms applied."""
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
        return q, k, v


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
