"""The speculative decode loop: propose, verify in one target forward, accept, roll back,
all inside one jit with fixed shapes and every row independent.

Axis letters: B batch, k proposed tokens, V vocab, N new tokens, H history capacity.

Invariant of every iteration: the target's cache (and a draft model's) holds the prompt and
every emitted token but the last, `pending`. An iteration feeds [pending, d_1 .. d_k] as one
chunk (a row writes only its 1 + n_valid real tokens), verifies the proposals against the
logits after each (`verify.accept`), emits the m accepted proposals and the token after them
(1 + m tokens, cut at EOS and max_new_tokens) and rolls the cache back by setting its
lengths to what was committed: slots past a row's length are never read and are
overwritten by its next chunk. When no row proposes anything the iteration is a plain one-
token decode step (`lax.cond`), so rows without proposals cost what plain decoding costs.

Adaptive switch: each row keeps a running acceptance rate (an exponential average of
accepted / proposed over its proposing iterations); when it falls below `min_accept` the
row stops proposing for `cooldown` iterations, then tries again from `min_accept` x 2.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..decode.programs import append_chunk, decode_tokens
from ..sampling import Knobs, pick
from . import lookup
from .verify import accept, target_probs

EMA = 0.7   # weight of the past in a row's running acceptance rate


class SpecStats(NamedTuple):
    """Per-row counters of a speculative generate (int32 [B] each)."""
    proposed: jax.Array   # proposals verified (a row's real proposals, summed over iterations)
    accepted: jax.Array   # proposals accepted and emitted
    forwards: jax.Array   # target forwards after the prefill (one per iteration the row ran)

    @property
    def acceptance(self):
        """accepted / proposed over the batch (nan when nothing was proposed)."""
        return float(jnp.sum(self.accepted)) / max(1, int(jnp.sum(self.proposed))) \
            if int(jnp.sum(self.proposed)) else float("nan")

    @property
    def mean_accepted_length(self):
        """Tokens emitted per target forward over the batch (1.0 is plain decoding): each forward
        emits its accepted proposals and one token of its own."""
        f = int(jnp.sum(self.forwards))
        return (float(jnp.sum(self.accepted)) + f) / f if f else float("nan")


class SpecPlan(NamedTuple):
    """The static part of a speculative loop (hashable: a jit static argument)."""
    num_tokens: int
    max_ngram: int = 3             # prompt lookup
    min_ngram: int = 1
    draft_cfg: object = None       # a DraftModel's config (None: prompt lookup)
    min_accept: float = 0.25
    cooldown: int = 16


def _draft(plan: SpecPlan, dparams, dcache, pending, active, knobs: Knobs, key):
    """k proposals of a draft model from `pending` on: (drafts [B, k], their distributions q
    [B, k, V] filtered as the target's, the draft cache holding pending and d_1 .. d_k)."""
    dcfg = plan.draft_cfg
    greedy = knobs.temperature <= 0

    def step(carry, i):
        tok, cache = carry
        logits, cache = decode_tokens(dcfg, dparams, tok, cache, active)
        q = target_probs(logits[:, None], knobs.temperature, knobs.top_k, knobs.top_p)[:, 0]
        drawn = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q), axis=-1).astype(jnp.int32)
        d = jnp.where(greedy, jnp.argmax(logits, -1).astype(jnp.int32), drawn)
        return (d, cache), (d, q)

    (last, dcache), (drafts, q) = jax.lax.scan(step, (pending, dcache), jnp.arange(plan.num_tokens))
    _, dcache = decode_tokens(dcfg, dparams, last, dcache, active)       # d_k too: the cache in step
    return drafts.T, jnp.swapaxes(q, 0, 1), dcache


def speculative_loop(cfg, params, logits, cache, hist, hist_len, N: int, knobs: Knobs, plan: SpecPlan,
                     dparams=None, dcache=None):
    """Generate N tokens per row from the prefill's last-token logits [B, V], `cache` (holding
    the prompt) and the rows' token histories hist [B, H] (prompt, room for N more).
    Returns (tokens [B, N] (pad after a row's end), lengths [B], cache holding prompt + every
    emitted token, SpecStats)."""
    B = logits.shape[0]
    k = plan.num_tokens
    W = N + k + 1
    pad = knobs.pad
    first, active, done = pick(logits, 0, jnp.zeros((B,), bool), knobs)
    rows = jnp.arange(B)[:, None]
    out = jnp.full((B, W), pad, jnp.int32).at[:, 0].set(first)
    hist = hist.at[jnp.arange(B), hist_len].set(first, mode="drop")
    n_out = jnp.ones((B,), jnp.int32)
    done = done | (N <= 1)
    zeros = jnp.zeros((B,), jnp.int32)
    state = (jnp.int32(0), first, cache, dcache, done, hist, hist_len + 1, out, n_out,
             SpecStats(zeros, zeros, zeros), jnp.ones((B,), jnp.float32), zeros)

    def more(s):
        return ~jnp.all(s[4])

    def body(s):
        it, pending, cache, dcache, done, hist, hlen, out, n_out, stats, rate, off = s
        active = ~done
        key = jax.random.fold_in(knobs.key, it + 1)
        k_draft, k_verify = jax.random.split(key)
        start = cache.lengths
        rem = N - n_out
        if plan.draft_cfg is None:
            drafts, nv = lookup.propose(hist, hlen, k, plan.max_ngram, plan.min_ngram)
            q = None
        else:
            drafts, q, dcache = _draft(plan, dparams, dcache, pending, active, knobs, k_draft)
            nv = jnp.full((B,), k, jnp.int32)
        nv = jnp.where(active & (off <= 0), jnp.clip(jnp.minimum(nv, rem - 1), 0, k), 0)

        def verify(c):
            chunk = jnp.concatenate([pending[:, None], drafts], axis=1)               # [B, k + 1]
            lg, c = append_chunk(cfg, params, chunk, jnp.where(active, 1 + nv, 0), c, every_logit=True)
            return accept(lg, drafts, nv, knobs, k_verify, q) + (c,)

        def plain(c):
            lg, c = decode_tokens(cfg, params, pending, c, active)
            tok, _, _ = pick(lg, it + 1, jnp.zeros((B,), bool), knobs)
            return jnp.zeros((B,), jnp.int32), tok, c

        m, nxt, cache = jax.lax.cond(jnp.any(nv > 0), verify, plain, cache)
        i = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(i < m[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                            jnp.where(i == m[:, None], nxt[:, None], pad))            # [B, k + 1]
        is_eos = (emitted[..., None] == knobs.eos[None, None, :]).any(-1) & (i <= m[:, None])
        first_eos = jnp.argmax(is_eos, axis=1)
        c = jnp.where(is_eos.any(1), first_eos + 1, m + 1)
        c = jnp.where(active, jnp.minimum(c, rem), 0)
        hit_eos = is_eos.any(1) & (first_eos + 1 <= c)
        cols = jnp.where(i < c[:, None], n_out[:, None] + i, W)
        out = out.at[rows, cols].set(emitted, mode="drop")
        hcols = jnp.where(i < c[:, None], hlen[:, None] + i, hist.shape[1])
        hist = hist.at[rows, hcols].set(emitted, mode="drop")
        last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
        pending = jnp.where(active, last, pending)
        lengths = jnp.where(active, start + c, start)
        cache = cache.replace(lengths=lengths)
        if dcache is not None:
            dcache = dcache.replace(lengths=lengths)
        n_out, hlen = n_out + c, hlen + c
        used = jnp.minimum(m, c)
        stats = SpecStats(stats.proposed + nv, stats.accepted + jnp.where(active, used, 0),
                          stats.forwards + active.astype(jnp.int32))
        tried = nv > 0
        rate = jnp.where(tried, EMA * rate + (1 - EMA) * used / jnp.maximum(nv, 1), rate)
        low = tried & (rate < plan.min_accept)
        off = jnp.where(low, plan.cooldown, jnp.maximum(off - 1, 0))
        rate = jnp.where(low, 2 * plan.min_accept, rate)
        done = done | (active & (hit_eos | (n_out >= N)))
        return it + 1, pending, cache, dcache, done, hist, hlen, out, n_out, stats, rate, off

    s = jax.lax.while_loop(more, body, state)
    _, pending, cache, _, _, _, _, out, n_out, stats, _, _ = s
    _, cache = decode_tokens(cfg, params, pending, cache, jnp.ones((B,), bool))  # the last token too
    return out[:, :N], n_out, cache, stats
