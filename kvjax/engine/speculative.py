"""The engine's speculative decode program: `steps` propose / verify / commit iterations per
call over the paged pools, every row with its own count of accepted tokens.

Axis letters: B rows, k proposed tokens (plan.num_tokens), V vocab, H history capacity (the
rows' page-table width in tokens), W pages per row, X top log-probabilities returned.

The rule is `kvjax.decode.speculative`'s (the oracle: `generate(speculate=...)`), on pages:
- an iteration feeds [pending, d_1 .. d_n] (n <= k real proposals) as one chunk at the row's
  length, verifies them against the logits after each (`verify.accept`), emits the m accepted
  and the token after them (cut at a stop token and max_tokens) and advances the row's length
  by what it emitted: slots of rejected tokens lie past the length, are never read, and the
  row's next chunk overwrites them (no page is freed or re-taken for them);
- a row proposes at most `room` tokens: what max_tokens leaves and what its pages hold (`cap`,
  the host's lookahead pages), and sits out the rest of a call once its pages are full, so no
  write ever reaches a page the row does not own (the host guarantees only `steps` tokens); the
  prefix cache only ever registers pages below the row's length (scheduler.py), so pages
  holding speculative slots never enter it;
- a draft model (DraftModel, including early exit) keeps its own pools, addressed by the same
  page table: the prefill writes both, every iteration feeds the draft the pending token and
  its own proposals, and rolling the length back rolls both back;
- randomness is per request, as everywhere in the engine: the draws of an iteration use
  fold_in(key(seed), n) (n: tokens the request generated before it), so a request's tokens do
  not depend on what else is in flight (they are distributed as the target's, not equal to a
  non-speculative run's draws);
- when no row proposes (nothing found, or every row switched off by the adaptive rule) the
  iteration is a plain one-token step (`lax.cond`).

Outputs per iteration: the k + 1 candidate tokens, how many each row emitted, the proposal
counts, and log-probabilities of the emitted tokens when asked; `Runner.collect` packs each
row's emitted tokens into the plain program's [steps, B] layout.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..cache.paged import gather_views
from ..decode.speculative import lookup
from ..decode.speculative.loop import SpecPlan, adapt, cut_run, emitted_run, shadow_hits
from ..decode.speculative.verify import accept, draft_probs_of
from .programs import LOGPROBS_MAX, count_trace, forward_pages, pin_pools, sample_rows, token_logprobs


def _knobs(samp):
    """verify.accept reads temperature / top_k / top_p [B] off its knobs."""
    return SimpleNamespace(temperature=samp["temperature"], top_k=samp["top_k"], top_p=samp["top_p"])


def _row_key(seed, n):
    return jax.random.fold_in(jax.random.key(seed), n)


def accept_rows(logits, drafts, nv, samp, n, q=None):
    """(accepted [B], next token [B]) with each row's own key (fold_in(key(seed), n)).

    logits [B, k + 1, V], drafts [B, k], nv [B] real proposals, q: the draft's [B, k, V] or None.
    All-greedy batches verify in one batched argmax; otherwise every row draws alone (vmap)."""
    def batched(_):
        return accept(logits, drafts, nv, _knobs(samp), jax.random.key(0), q)

    def per_row(_):
        def one(lg, d, v, t, tk, tp, seed, i, *qq):
            kn = _knobs({"temperature": t[None], "top_k": tk[None], "top_p": tp[None]})
            a, x = accept(lg[None], d[None], v[None], kn, _row_key(seed, i), qq[0][None] if qq else None)
            return a[0], x[0]
        rows = (logits, drafts, nv, samp["temperature"], samp["top_k"], samp["top_p"], samp["seed"], n)
        return jax.vmap(one)(*rows, *(() if q is None else (q,)))

    return jax.lax.cond(jnp.all(samp["temperature"] <= 0), batched, per_row, None)


class _Call(NamedTuple):
    """What every iteration of one call reads (arrays traced, the rest static)."""
    cfg: object
    params: object
    plan: SpecPlan
    dparams: object
    table: jax.Array       # [B, W]
    samp: dict             # temperature, top_k, top_p, seed [B]
    max_n: jax.Array       # [B]
    cap: jax.Array         # [B] tokens the row's pages hold
    stops: jax.Array       # [B, E]
    logprobs: bool


def _draft(call: _Call, pools, tok, lens, room, n):
    """k proposals of the draft model (its pools hold the row's committed tokens): feeds pending
    and d_1 .. d_k at lens .. lens + k (a row writes only positions its `room` allows), so the
    draft's pools hold every proposal afterwards. Returns (drafts [B, k], q [B, k, V] (zeros for
    an all-greedy batch), the draft's pools)."""
    samp, k = call.samp, call.plan.num_tokens
    greedy = samp["temperature"] <= 0

    def feed(t, pools, i):
        dk, dv, dw = pools
        lg, dk, dv, dw = forward_pages(call.plan.draft_cfg, call.dparams, dk, dv, t[:, None],
                                       (i <= room).astype(jnp.int32), lens + i, call.table, jnp.zeros_like(lens), dw)
        return lg[:, 0], (dk, dv, dw)

    def step(carry, i):
        t, pools = carry
        lg, pools = feed(t, pools, i)
        q = draft_probs_of(lg, samp["temperature"], samp["top_k"], samp["top_p"])
        keys = jax.vmap(lambda s, j: jax.random.fold_in(_row_key(s, j), 1000 + i))(samp["seed"], n)
        drawn = jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys, q).astype(jnp.int32)
        d = jnp.where(greedy, jnp.argmax(lg, -1).astype(jnp.int32), drawn)
        return (d, pools), (d, q)

    (last, pools), (drafts, q) = jax.lax.scan(step, (tok, pools), jnp.arange(k))
    _, pools = feed(last, pools, k)                    # d_k too: the pools hold every proposal
    return drafts.T, jnp.swapaxes(q, 0, 1), pools


def _propose(call: _Call, dp, hist, tok, lens, n, active, proposing, room):
    """(drafts [B, k], real proposals nv [B], q or None, the draft's pools, found [B] or None):
    prompt lookup over the rows' histories (found: the row's lookup had a proposal, proposed
    or not: the adaptive switch's shadow), or the draft model (only the pending token when no
    row proposes)."""
    plan, B, k = call.plan, tok.shape[0], call.plan.num_tokens
    if plan.draft_cfg is None:
        drafts, nv = lookup.propose(hist, lens + 1, k, plan.max_ngram, plan.min_ngram)
        return drafts, jnp.where(proposing, jnp.minimum(nv, room), 0), None, dp, nv > 0

    def catch_up(dp):
        dk, dv, dw = dp
        _, dk, dv, dw = forward_pages(plan.draft_cfg, call.dparams, dk, dv, tok[:, None], active.astype(jnp.int32),
                                      lens, call.table, jnp.zeros_like(lens), dw)
        return jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, call.cfg.vocab_size), jnp.float32), (dk, dv, dw)

    drafts, q, dp = jax.lax.cond(jnp.any(proposing),
                                 lambda dp: _draft(call, dp, tok, lens, jnp.where(active, room, -1), n),
                                 catch_up, dp)
    return drafts, jnp.where(proposing, room, 0), q, dp, None


def _verify(call: _Call, pools, tok, drafts, nv, lens, n, active, q):
    """One target forward: the chunk [pending, proposals] verified (or, when no row proposes, a
    plain one-token step; when no row runs, nothing). Returns (accepted m [B], next token [B],
    logprob outputs or None, pools)."""
    X, k = min(LOGPROBS_MAX, call.cfg.vocab_size), call.plan.num_tokens

    def verify(pools):
        keys, values, views = pools
        chunk = jnp.concatenate([tok[:, None], drafts], axis=1)                     # [B, k + 1]
        lg, keys, values, views = forward_pages(call.cfg, call.params, keys, values, chunk,
                                                jnp.where(active, 1 + nv, 0), lens, call.table, None, views)
        m, nxt = accept_rows(lg, drafts, nv, call.samp, n, q)
        extra = token_logprobs(lg, emitted_run(drafts, m, nxt), X) if call.logprobs else None
        return m, nxt, extra, (keys, values, views)

    def plain(pools):
        keys, values, views = pools
        lg, keys, values, views = forward_pages(call.cfg, call.params, keys, values, tok[:, None],
                                                active.astype(jnp.int32), lens, call.table, jnp.zeros_like(lens), views)
        nxt = sample_rows(lg[:, 0], call.samp, n)
        extra = None
        if call.logprobs:   # position 0 only (one token), the rest padding
            pad = lambda a: jnp.pad(a[:, None], ((0, 0), (0, k)) + ((0, 0),) * (a.ndim - 1))  # noqa: E731
            extra = tuple(pad(a) for a in token_logprobs(lg[:, 0], nxt, X))
        return jnp.zeros_like(lens), nxt, extra, (keys, values, views)

    def idle(pools):    # every row done or out of pages: no forward at all
        extra = None
        if call.logprobs:
            B = tok.shape[0]
            extra = (jnp.zeros((B, k + 1), jnp.float32), jnp.zeros((B, k + 1, X), jnp.float32),
                     jnp.zeros((B, k + 1, X), jnp.int32))
        return jnp.zeros_like(lens), tok, extra, pools

    branch = jnp.where(jnp.any(nv > 0), 2, jnp.where(jnp.any(active), 1, 0))
    return jax.lax.switch(branch, (idle, plain, verify), pools)


def _iteration(call: _Call, carry, _):
    """Propose, verify, commit: a row emits 1 + accepted tokens, cut at a stop token and
    max_tokens; its length advances by what it emitted (the rejected slots lie past it)."""
    pools, dp, tok, lens, n, alive, hist, rate, off, tot = carry
    k, plan = call.plan.num_tokens, call.plan
    # a row runs while its pages hold its pending token: one that filled them (it advanced
    # faster than the host's plain need) idles to the end of the call, still alive
    active = alive & (lens < call.cap)
    room = jnp.where(active, jnp.clip(jnp.minimum(call.max_n - n - 1, call.cap - lens - 1), 0, k), 0)
    proposing = active & (off <= 0) & (room > 0)
    drafts, nv, q, dp, found = _propose(call, dp, hist, tok, lens, n, active, proposing, room)
    m, nxt, extra, pools = _verify(call, pools, tok, drafts, nv, lens, n, active, q)

    emitted = emitted_run(drafts, m, nxt)                                                # [B, k + 1]
    c, hit_stop = cut_run(emitted, m, call.stops, call.max_n - n, active)
    i_k = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    hist = hist.at[jnp.arange(tok.shape[0])[:, None],
                   jnp.where(i_k < c[:, None], lens[:, None] + 1 + i_k, hist.shape[1])].set(emitted, mode="drop")
    last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
    used = jnp.minimum(m, c)
    tot = (tot[0] + nv, tot[1] + jnp.where(active, used, 0), tot[2] + active.astype(jnp.int32))
    rate, off = adapt(rate, off, nv, used, plan, shadow_hits(found, drafts, nxt))
    n, lens = n + c, lens + c               # pending and the emitted tokens but the last are written
    alive = alive & ~(active & (hit_stop | (n >= call.max_n)))
    carry = (pools, dp, jnp.where(c > 0, last, tok), lens, n, alive, hist, rate, off, tot)
    return carry, (emitted, c, extra)


@partial(jax.jit, static_argnums=(0, 6, 7, 8, 9), donate_argnums=(2, 3, 11))
def spec_decode_steps(cfg, params, keys, values, state, page_table, steps: int, logprobs: bool,
                      plan: SpecPlan, pool_sharding=None, dparams=None, dpools=None):
    """`steps` speculative iterations for every row in one `lax.scan`.

    state: decode_steps's (tok, lens, n, active, max_n, stops, sampling [B]) plus hist [B, H]
    (each row's prompt and generated tokens, pending last), cap [B] (tokens its pages hold),
    rate float32 [B] and off int32 [B] (the adaptive switch). dparams / dpools: a draft model's
    parameters and (key pools, value pools), or None for prompt lookup. Returns (outputs dict:
    token [steps, B, k + 1], count [steps, B] emitted, proposed / accepted / forwards [B] summed
    over the call, logprob [steps, B, k + 1] and top / top_ids [steps, B, k + 1, X] when asked;
    the final state (tok, lens, n, active, rate, off); key pools; value pools; draft pools)."""
    count_trace()
    samp = {s: state[s] for s in ("temperature", "top_k", "top_p", "seed")}
    call = _Call(cfg, params, plan, dparams, page_table, samp, state["max_n"], state["cap"], state["stops"], logprobs)
    pools = (keys, values, gather_views(keys, values, page_table))
    dp = None if dpools is None else (*dpools, gather_views(*dpools, page_table))
    zeros = jnp.zeros_like(state["lens"])
    init = (pools, dp, state["tok"], state["lens"], state["n"], state["active"], state["hist"],
            state["rate"], state["off"], (zeros, zeros, zeros))
    carry, (toks, counts, extra) = jax.lax.scan(partial(_iteration, call), init, None, length=steps)
    (keys, values, _), dp, tok, lens, n, active, _, rate, off, tot = carry
    out = {"token": toks, "count": counts, "proposed": tot[0], "accepted": tot[1], "forwards": tot[2]}
    if logprobs:
        out["logprob"], out["top"], out["top_ids"] = extra
    final = {"tok": tok, "lens": lens, "n": n, "active": active, "rate": rate, "off": off}
    dpools = None if dp is None else (pin_pools(dp[0], pool_sharding), pin_pools(dp[1], pool_sharding))
    return out, final, pin_pools(keys, pool_sharding), pin_pools(values, pool_sharding), dpools
