"""Attention math with no Flax and no cache: masks, scores, one softmax over key blocks.

Axis letters: B batch, T query chunk, S key slots, N query heads, K kv heads, G query heads
per kv head (N = K * G), H head dim.

Both the model's attention (kvjax/attention.py) and every cache layout's read path
(kvjax/cache/) use these functions, so windows, soft-capping, GQA and masking behave the
same on dense, ring, pressed, KIVI and paged storage. `dot_attention` is the plain
reference an accelerator kernel is tested against. `softmax_loop` is the same softmax as an
online one over loops of key blocks whose bounds are traced (flash-style: the blocks a
chunk's queries cannot see are never visited, blocks every query sees fully skip the mask,
and no score matrix wider than a block exists), on queries laid out by `group_queries`.

One mask rule for every block: a key at position j is visible to a query at position p
when it is valid, j <= p, and (no window, or p - j < window, or j < sinks).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min  # finite, so a fully masked padding row never makes NaN


def attention_mask(q_pos, k_pos, k_valid, window=None, sinks=0):
    """Visibility [B, 1, T, S] from q_pos [B, T], k_pos and k_valid [B, S] (every kv head sees
    the same slots), or [B, K, T, S] from per-head k_pos, k_valid [B, K, S] (pressed caches)."""
    if k_pos.ndim == 2:
        k_pos, k_valid = k_pos[:, None], k_valid[:, None]
    qp = q_pos[:, None, :, None]                                  # [B, 1, T, 1]
    kp = k_pos[:, :, None, :]                                     # [B, K', 1, S]
    mask = k_valid[:, :, None, :] & (kp <= qp)
    if window is not None:
        near = qp - kp < window
        if sinks:
            near = near | (kp < sinks)
        mask = mask & near
    return mask


def f32_dot(spec, a, b):
    """einsum accumulating and returning float32. XLA's CPU runtime has no bf16 x bf16 -> f32
    dot, so on CPU half-precision operands are widened first; accelerators read them as
    stored (the cache stays half-size in memory traffic)."""
    if jax.default_backend() == "cpu" and (a.dtype.itemsize < 4 or b.dtype.itemsize < 4):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def scores(q, k, scale: float | None = None, softcap: float | None = None):
    """q [B, T, N, H], k [B, K, S, H] -> float32 scaled scores [B, K, G, T, S].

    scale: None for 1/sqrt(H); softcap (Gemma 2): scores -> softcap * tanh(scores / softcap),
    applied after scaling and before the mask, as transformers does. A layer's own values
    come from `score_args(cfg)`."""
    B, T, N, H = q.shape
    K = k.shape[1]
    qg = q.reshape(B, T, K, N // K, H)
    return _scaled(f32_dot("btkgh,bksh->bkgts", qg, k), H, scale, softcap)


def _scaled(s, H: int, scale, softcap):
    s = s * (H ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


def score_args(cfg) -> tuple:
    """(scale, softcap) for `scores`: Gemma 2/3 scale by query_pre_attn_scalar ** -0.5."""
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    return scale, cfg.attn_softcap


def softmax_blocks(blocks, q_dtype, column_sums: bool = False, query_valid=None):
    """One softmax over several key blocks. blocks: [(scores [B,K,G,T,S_i], mask [B,K',T,S_i]
    (K' = 1 or K; or [B,K,G',T,S_i] per query head), values [B,K,S_i,H])] -> [B, T, N, H].

    column_sums: also return, per block, the attention each key received summed over the
    queries (those with query_valid [B, T], when given), float32 [B, N, S_i] (H2O's observed
    attention)."""
    masked = [jnp.where(m[:, :, None] if m.ndim == 4 else m, s, NEG) for s, m, _ in blocks]
    probs = jax.nn.softmax(jnp.concatenate(masked, axis=-1), axis=-1)
    out, offset, sums = 0.0, 0, []
    for s, _, v in blocks:
        p = probs[..., offset:offset + s.shape[-1]]
        if column_sums:
            B, K, G = p.shape[:3]
            counted = p if query_valid is None else jnp.where(query_valid[:, None, None, :, None], p, 0.0)
            sums.append(counted.sum(axis=3).reshape(B, K * G, -1))
        out = out + f32_dot("bkgts,bksh->btkgh", p.astype(v.dtype), v)
        offset += s.shape[-1]
    B, T, K, G, H = out.shape
    out = out.reshape(B, T, K * G, H).astype(q_dtype)
    return (out, sums) if column_sums else out


def softmax_loop(block, segments, acc_shape: tuple):
    """One softmax over key blocks, online: a running max and sum and a float32 accumulator
    per query row, the blocks visited in `lax.fori_loop`s whose bounds are traced.

    segments: [(lo, hi, masked)]: blocks lo <= j < hi, in order; `masked` (a Python bool)
    says whether the segment's blocks need a mask (False: every query sees every key of
    them, so no mask is built or applied). block(j, masked) -> (scores [B, K, M, S], mask
    broadcastable to the scores or None when not masked, values [B, K, S, H]); acc_shape:
    (B, K, M, H), M query rows per kv head (`grouped_queries` lays out G heads x T tokens).
    Equals `softmax_blocks` over the same blocks up to float32 rounding: masked scores are
    NEG, so they weigh exp(NEG - max) = 0 beside any visible key, and a query that sees no
    key of any visited block averages the visited values, as `softmax_blocks` does over its
    blocks. Returns float32 [B, K, M, H] (zeros for rows where no block was visited)."""
    def step(masked, j, carry):
        top, total, acc = carry
        s, mask, v = block(j, masked)
        if masked:
            s = jnp.where(mask, s, NEG)
        new_top = jnp.maximum(top, s.max(axis=-1))
        p = jnp.exp(s - new_top[..., None])
        fade = jnp.exp(top - new_top)
        acc = acc * fade[..., None] + f32_dot("bkms,bksh->bkmh", p.astype(v.dtype), v)
        return new_top, total * fade + p.sum(axis=-1), acc

    carry = (jnp.full(acc_shape[:3], NEG, jnp.float32), jnp.zeros(acc_shape[:3], jnp.float32),
             jnp.zeros(acc_shape, jnp.float32))
    for lo, hi, masked in segments:
        carry = jax.lax.fori_loop(lo, hi, lambda j, c, m=masked: step(m, j, c), carry)
    _, total, acc = carry
    return acc / jnp.where(total > 0, total, 1.0)[..., None]     # no block visited: zeros, not NaN


def group_queries(q, K: int):
    """q [B, T, N, H] -> [B, K, G * T, H]: the G query heads of each of the K kv heads and
    their T tokens as one row axis (M = G * T), so a key block's scores are one batched
    matmul per kv head and no per-block transpose exists. `ungroup` is its inverse."""
    B, T, N, H = q.shape
    return q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, N // K * T, H)


def ungroup(out, T: int, dtype):
    """[B, K, G * T, H] -> [B, T, K * G, H] in dtype: `group_queries`' inverse."""
    B, K, M, H = out.shape
    return out.reshape(B, K, M // T, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, M // T * K, H).astype(dtype)


def group_mask(mask, G: int):
    """A mask [B, K', T, S] over tokens -> [B, K', G * T, S] over `group_queries`' rows."""
    B, K, T, S = mask.shape
    return jnp.broadcast_to(mask[:, :, None], (B, K, G, T, S)).reshape(B, K, G * T, S)


def fold_scale(qm, scale: float | None):
    """(queries, scale left to apply) with the score scale moved into the queries where that
    is exact enough: float32 queries, or a power-of-two scale (exact in any dtype). A block
    loop then never rescales its [M, S] scores (one pass over them fewer per block)."""
    H = qm.shape[-1]
    scale = H ** -0.5 if scale is None else scale
    if qm.dtype == jnp.float32 or math.frexp(scale)[0] == 0.5:
        return qm * jnp.asarray(scale, qm.dtype), 1.0
    return qm, scale


def grouped_scores(qm, k, scale: float | None = None, softcap: float | None = None):
    """qm [B, K, M, H] (`group_queries`), k [B, K, S, H] -> float32 [B, K, M, S], scaled and
    soft-capped as `scores` does (the same values, laid out by rows)."""
    return _scaled(f32_dot("bkmh,bksh->bkms", qm, k), qm.shape[-1], scale, softcap)


def dot_attention(q, k, v, mask):
    """Reference grouped-query attention over one block; the oracle for faster kernels.

    q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] or [B, K, T, S] -> [B, T, N, H].
    """
    return softmax_blocks([(scores(q, k), mask[:, None] if mask.ndim == 3 else mask, v)], q.dtype)


def attend_view(q, kb, vb, positions, ends, window, sinks, score):
    """Attention over dense views kb, vb [B, K, S, H] whose slot s holds position s, for rows
    holding their first `ends[b]` tokens; score(q, keys) -> float32 [B, K, G, T, S]."""
    B, S = kb.shape[0], kb.shape[2]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
    valid = k_pos < ends[:, None]
    mask = attention_mask(positions, k_pos, valid, window, sinks)
    return softmax_blocks([(score(q, kb), mask, vb)], q.dtype)
