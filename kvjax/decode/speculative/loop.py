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
With prompt lookup the proposals cost nothing to compute, so a row that is switched off
still looks them up: as soon as its lookup's first token is the token the step emits (the
text has turned to copying, e.g. a loop or a quoted passage), it proposes again at once.

DecodingPress: plain decoding compacts the cache after fixed decode steps (plans.
decoding_segments); here a row's verify chunk ends at its next such step, and the rows whose
committed tokens reach it are compacted before their next forward, so every query sees the
cache plain decoding's sees.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..programs import append_chunk, decode_tokens
from ...press.decoding import compress_cache
from ...sampling import Knobs, pick
from . import lookup
from .verify import accept, draft_probs_of

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
    decoding: object = None        # a DecodingPress compacting on plain decoding's schedule
    first_compression: int = 0     # ... after this many decode steps, then every interval


def next_compression(plan: SpecPlan, steps):
    """The decode step [B] (plain generate's count: step j writes the j-th emitted token) after
    which a DecodingPress next compacts, for rows that have run `steps` [B] decode steps: the
    first one after `first_compression` steps, then one every `compression_interval`
    (plans.decoding_segments' schedule)."""
    every = plan.decoding.compression_interval
    late = jnp.maximum(0, -(-(steps + 1 - plan.first_compression) // every))
    return plan.first_compression + late * every


def compress_rows(cache, hit, press):
    """The cache with rows `hit` [B] compacted by the DecodingPress (the others unchanged);
    nothing runs when no row is hit."""
    def some(c):
        new = compress_cache(c, press)
        return jax.tree.map(lambda a, b: jnp.where(hit.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, c)
    return jax.lax.cond(jnp.any(hit), some, lambda c: c, cache)


def _draft(plan: SpecPlan, dparams, dcache, pending, active, knobs: Knobs, key):
    """k proposals of a draft model from `pending` on: (drafts [B, k], their distributions q
    [B, k, V] filtered as the target's, the draft cache holding pending and d_1 .. d_k)."""
    dcfg = plan.draft_cfg
    greedy = knobs.temperature <= 0

    def step(carry, i):
        tok, cache = carry
        logits, cache = decode_tokens(dcfg, dparams, tok, cache, active)
        q = draft_probs_of(logits, knobs.temperature, knobs.top_k, knobs.top_p)
        drawn = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q), axis=-1).astype(jnp.int32)
        d = jnp.where(greedy, jnp.argmax(logits, -1).astype(jnp.int32), drawn)
        return (d, cache), (d, q)

    (last, dcache), (drafts, q) = jax.lax.scan(step, (pending, dcache), jnp.arange(plan.num_tokens))
    _, dcache = decode_tokens(dcfg, dparams, last, dcache, active)       # d_k too: the cache in step
    return drafts.T, jnp.swapaxes(q, 0, 1), dcache


class _State(NamedTuple):
    it: jax.Array          # iterations run
    pending: jax.Array     # [B] the last emitted token, not yet in the cache
    cache: object
    dcache: object         # a DraftModel's cache (None for prompt lookup)
    done: jax.Array        # [B]
    hist: jax.Array        # [B, H] prompt + emitted tokens
    hlen: jax.Array        # [B]
    out: jax.Array         # [B, N + k + 1] emitted tokens, pad after
    n_out: jax.Array       # [B]
    stats: SpecStats
    rate: jax.Array        # [B] running acceptance rate
    off: jax.Array         # [B] iterations left without proposals


def speculative_loop(cfg, params, logits, cache, hist, hist_len, N: int, knobs: Knobs, plan: SpecPlan,
                     dparams=None, dcache=None):
    """Generate N tokens per row from the prefill's last-token logits [B, V], `cache` (holding
    the prompt) and the rows' token histories hist [B, H] (prompt, room for N more).
    Returns (tokens [B, N] (pad after a row's end), lengths [B], cache holding prompt + every
    emitted token, SpecStats)."""
    B = logits.shape[0]
    first, _, done, _ = pick(logits, 0, jnp.zeros((B,), bool), knobs)   # (no controls: see decode/api.py)
    out = jnp.full((B, N + plan.num_tokens + 1), knobs.pad, jnp.int32).at[:, 0].set(first)
    hist = hist.at[jnp.arange(B), hist_len].set(first, mode="drop")
    zeros = jnp.zeros((B,), jnp.int32)
    state = _State(jnp.int32(0), first, cache, dcache, done | (N <= 1), hist, hist_len + 1, out,
                   jnp.ones((B,), jnp.int32), SpecStats(zeros, zeros, zeros), jnp.ones((B,), jnp.float32), zeros)
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                           lambda s: _iteration(cfg, params, N, knobs, plan, dparams, s), state)
    _, cache = decode_tokens(cfg, params, s.pending, s.cache, jnp.ones((B,), bool))  # the last token too
    if plan.decoding is not None:     # that token is plain generate's last step: compacted if it is due
        cache = compress_rows(cache, next_compression(plan, s.n_out - 1) == s.n_out, plan.decoding)
    return s.out[:, :N], s.n_out, cache, s.stats


def kivi_room(lengths, residual_length: int):
    """Proposals a KIVI row may verify [B]: its chunk [pending, d_1 .. d_n] must not complete a
    residual block. A completed block is quantised at once (rejected tokens with it, past any
    rollback), and one-token decoding quantises it as soon as it completes, so later queries of
    a chunk crossing the boundary would read unquantised keys where decoding reads quantised
    ones. With 1 + n tokens ending before the block's last position, the chunk's queries see
    exactly what one-token decoding sees; a row at its block's end steps one token (which may
    complete the block: that token is always committed). While any row's pending token completes
    its block the whole iteration is a plain one-token step: inside a multi-token chunk that
    token's query would read its own key unquantised, where decoding reads the completed block
    quantised."""
    return jnp.maximum(residual_length - 2 - lengths % residual_length, 0)


def _iteration(cfg, params, N: int, knobs: Knobs, plan: SpecPlan, dparams, s: _State) -> _State:
    """Propose, verify in one forward (or a plain step when no row proposes), commit."""
    B, k = s.pending.shape[0], plan.num_tokens
    active = ~s.done
    k_draft, k_verify = jax.random.split(jax.random.fold_in(knobs.key, s.it + 1))
    dcache, q = s.dcache, None
    if plan.draft_cfg is None:
        drafts, nv = lookup.propose(s.hist, s.hlen, k, plan.max_ngram, plan.min_ngram)
        found = nv > 0            # a lookup proposal exists, proposed or not (the switch's shadow)
    else:
        found = None
        def catch_up(dc):   # no row proposes: the draft cache only takes the token that commits
            _, dc = decode_tokens(plan.draft_cfg, dparams, s.pending, dc, active)
            return (jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, cfg.vocab_size), jnp.float32), dc)
        drafts, q, dcache = jax.lax.cond(
            jnp.any(active & (s.off <= 0)),
            lambda dc: _draft(plan, dparams, dc, s.pending, active, knobs, k_draft), catch_up, dcache)
        nv = jnp.full((B,), k, jnp.int32)
    nv = jnp.where(active & (s.off <= 0), jnp.clip(jnp.minimum(nv, N - s.n_out - 1), 0, k), 0)
    if plan.decoding is not None:   # a chunk ends at the step a DecodingPress compacts after
        nv = jnp.minimum(nv, next_compression(plan, s.n_out - 1) - s.n_out)
    chunked = jnp.any(nv > 0)
    if s.cache.kind == "kivi":   # a verify chunk never completes a residual block (see kivi_room)
        nv = jnp.minimum(nv, kivi_room(s.cache.lengths, s.cache.quant[2]))
        ends = active & (s.cache.lengths % s.cache.quant[2] == s.cache.quant[2] - 1)
        chunked = jnp.any(nv > 0) & ~jnp.any(ends)
        nv = jnp.where(chunked, nv, 0)

    def verify(c):
        chunk = jnp.concatenate([s.pending[:, None], drafts], axis=1)                # [B, k + 1]
        lg, c = append_chunk(cfg, params, chunk, jnp.where(active, 1 + nv, 0), c, every_logit=True)
        return accept(lg, drafts, nv, knobs, k_verify, q) + (c,)

    def plain(c):
        lg, c = decode_tokens(cfg, params, s.pending, c, active)
        return (jnp.zeros((B,), jnp.int32), pick(lg, s.it + 1, jnp.zeros((B,), bool), knobs)[0], c)

    m, nxt, cache = jax.lax.cond(chunked, verify, plain, s.cache)
    return _commit(s._replace(cache=cache, dcache=dcache), s.cache, drafts, nv, m, nxt, N, knobs, plan,
                   shadow_hits(found, drafts, nxt))


def roll_back(cache, before, lengths):
    """The cache after a verify chunk, cut back to `lengths` [B] (what was committed): the
    lengths; a ring's slots at positions past them forgotten; a pressed cache's per-head fills
    set to what they were `before` the chunk plus the committed tokens (every head keeps every
    decoded token; ring layers of a hybrid cache keep their placeholder fills) and its slots
    past the lengths emptied."""
    cache = cache.replace(lengths=lengths)
    if cache.slot_pos is not None:
        cache = cache.replace(slot_pos=jnp.where(cache.slot_pos >= lengths[:, None], -1, cache.slot_pos))
    if cache.pressed:
        c = (lengths - before.lengths)[:, None]
        fill = tuple(f if p.shape[-1] == 0 else jnp.minimum(f + c, cache.layer_slots(i))
                     for i, (f, p) in enumerate(zip(before.head_fill, cache.head_pos)))
        pos = tuple(jnp.where(p >= lengths[:, None, None], -1, p) for p in cache.head_pos)
        cache = cache.replace(head_fill=fill, head_pos=pos)
    return cache


def emitted_run(drafts, m, nxt):
    """[B, k + 1]: the m accepted proposals, then the next token, then zeros (never emitted)."""
    i = jnp.arange(drafts.shape[1] + 1, dtype=jnp.int32)[None, :]
    return jnp.where(i < m[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), jnp.where(i == m[:, None], nxt[:, None], 0))


def cut_run(emitted, m, stops, left, active):
    """(tokens each row emits [B], whether it emitted a stop token [B]): the run of m accepted
    proposals and the next token, cut after its first stop token (stops [B or 1, E], -1 padded)
    and at `left` [B] tokens; inactive rows emit nothing."""
    i = jnp.arange(emitted.shape[1], dtype=jnp.int32)[None, :]
    is_stop = (emitted[..., None] == stops[:, None, :]).any(-1) & (i <= m[:, None])
    first = jnp.argmax(is_stop, axis=1)
    c = jnp.where(active, jnp.minimum(jnp.where(is_stop.any(1), first + 1, m + 1), left), 0)
    return c, is_stop.any(1) & (first + 1 <= c)


def shadow_hits(found, drafts, nxt):
    """[B] for the adaptive switch: the row's lookup had a proposal (`found`, proposed or not)
    whose first token is `nxt`, the token the step emitted after it; None (no shadow) for a
    draft model (found None: its proposals are not free)."""
    return None if found is None else found & (drafts[:, 0] == nxt)


def adapt(rate, off, nv, used, plan: SpecPlan, shadow=None):
    """The adaptive switch after an iteration: (running acceptance rate, iterations left without
    proposals) per row, from its nv proposals of which `used` were emitted. shadow [B] (prompt
    lookup; None for a draft model): the row's lookup had a proposal whose first token is the
    one the step emitted; a row switched off with such a hit proposes again next iteration."""
    tried = nv > 0
    rate = jnp.where(tried, EMA * rate + (1 - EMA) * used / jnp.maximum(nv, 1), rate)
    low = tried & (rate < plan.min_accept)
    off = jnp.where(low, plan.cooldown, jnp.maximum(off - 1, 0))
    if shadow is not None:
        off = jnp.where(~tried & shadow, 0, off)
    return jnp.where(low, 2 * plan.min_accept, rate), off


def _commit(s: _State, before, drafts, nv, m, nxt, N: int, knobs: Knobs, plan: SpecPlan, shadow=None) -> _State:
    """Emit the m accepted proposals and the next token (cut at EOS and N), roll the caches back
    to what was committed, count, and update the adaptive switch."""
    k, start = plan.num_tokens, before.lengths
    active = ~s.done
    rows, i = jnp.arange(drafts.shape[0])[:, None], jnp.arange(k + 1)[None, :]
    emitted = emitted_run(drafts, m, nxt)                                              # [B, k + 1]
    c, hit_eos = cut_run(emitted, m, knobs.eos[None, :], N - s.n_out, active)          # tokens emitted
    out = s.out.at[rows, jnp.where(i < c[:, None], s.n_out[:, None] + i, s.out.shape[1])].set(
        emitted, mode="drop")
    hist = s.hist.at[rows, jnp.where(i < c[:, None], s.hlen[:, None] + i, s.hist.shape[1])].set(
        emitted, mode="drop")
    last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
    lengths = jnp.where(active, start + c, start)          # committed: pending + the emitted but last
    dcache = None if s.dcache is None else s.dcache.replace(lengths=lengths)
    used = jnp.minimum(m, c)
    stats = SpecStats(s.stats.proposed + nv, s.stats.accepted + jnp.where(active, used, 0),
                      s.stats.forwards + active.astype(jnp.int32))
    rate, off = adapt(s.rate, s.off, nv, used, plan, shadow)
    n_out = s.n_out + c
    cache = roll_back(s.cache, before, lengths)
    if plan.decoding is not None:   # rows whose committed tokens reached a compaction step
        cache = compress_rows(cache, active & (n_out - 1 == next_compression(plan, s.n_out - 1)), plan.decoding)
    return _State(s.it + 1, jnp.where(active, last, s.pending), cache, dcache,
                  s.done | (active & (hit_eos | (n_out >= N))), hist, s.hlen + c, out, n_out, stats, rate, off)
