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

import jax
import jax.numpy as jnp

from ..cache.paged import gather_views
from ..decode.speculative import lookup
from ..decode.speculative.loop import EMA, SpecPlan
from ..decode.speculative.verify import accept, target_probs
from .programs import LOGPROBS_MAX, _forward, _pin, _traced, sample_rows, token_logprobs


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


def _draft(plan: SpecPlan, dparams, pools, table, tok, lens, room, samp, n):
    """k proposals of the draft model (its pools hold the row's committed tokens): feeds pending
    and d_1 .. d_k at lens .. lens + k (a row writes only positions its `room` allows), so the
    draft's pools hold every proposal afterwards. Returns (drafts [B, k], q [B, k, V] (zeros for
    an all-greedy batch), the draft's pools)."""
    dcfg, k = plan.draft_cfg, plan.num_tokens
    greedy = samp["temperature"] <= 0
    zeros = jnp.zeros_like(lens)

    def feed(t, pools, i):
        dk, dv, dw = pools
        lg, dk, dv, dw = _forward(dcfg, dparams, dk, dv, t[:, None], (i <= room).astype(jnp.int32),
                                  lens + i, table, zeros, dw)
        return lg[:, 0], (dk, dv, dw)

    def step(carry, i):
        t, pools = carry
        lg, pools = feed(t, pools, i)
        q = jax.lax.cond(jnp.all(greedy), lambda l: jnp.zeros(l.shape, jnp.float32),
                         lambda l: target_probs(l[:, None], samp["temperature"], samp["top_k"],
                                                samp["top_p"])[:, 0], lg)
        keys = jax.vmap(lambda s, j: jax.random.fold_in(_row_key(s, j), 1000 + i))(samp["seed"], n)
        drawn = jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys, q).astype(jnp.int32)
        d = jnp.where(greedy, jnp.argmax(lg, -1).astype(jnp.int32), drawn)
        return (d, pools), (d, q)

    (last, pools), (drafts, q) = jax.lax.scan(step, (tok, pools), jnp.arange(k))
    _, pools = feed(last, pools, k)                    # d_k too: the pools hold every proposal
    return drafts.T, jnp.swapaxes(q, 0, 1), pools


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
    _traced()
    k, V = plan.num_tokens, cfg.vocab_size
    X = min(LOGPROBS_MAX, V)
    samp = {s: state[s] for s in ("temperature", "top_k", "top_p", "seed")}
    max_n, cap, stops = state["max_n"], state["cap"], state["stops"]
    i_k = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    draft = plan.draft_cfg is not None

    def iteration(carry, _):
        keys, values, views, dp, tok, lens, n, alive, hist, rate, off, tot = carry
        # a row runs while its pages hold its pending token: one that filled them (it advanced
        # faster than the host's plain need) idles to the end of the call, still alive
        active = alive & (lens < cap)
        room = jnp.where(active, jnp.clip(jnp.minimum(max_n - n - 1, cap - lens - 1), 0, k), 0)
        proposing = active & (off <= 0) & (room > 0)
        if not draft:
            drafts, nv = lookup.propose(hist, lens + 1, k, plan.max_ngram, plan.min_ngram)
            q = None
        else:
            def catch_up(dp):    # no row proposes: the draft takes only the pending token
                dk, dv, dw = dp
                _, dk, dv, dw = _forward(plan.draft_cfg, dparams, dk, dv, tok[:, None], active.astype(jnp.int32),
                                         lens, page_table, jnp.zeros_like(lens), dw)
                return jnp.zeros((tok.shape[0], k), jnp.int32), jnp.zeros((tok.shape[0], k, V), jnp.float32), \
                    (dk, dv, dw)
            drafts, q, dp = jax.lax.cond(
                jnp.any(proposing),
                lambda dp: _draft(plan, dparams, dp, page_table, tok, lens, jnp.where(active, room, -1), samp, n),
                catch_up, dp)
            nv = jnp.full_like(lens, k)
        nv = jnp.where(proposing, jnp.minimum(nv, room), 0)

        def emitted_of(m, nxt):
            return jnp.where(i_k < m[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                             jnp.where(i_k == m[:, None], nxt[:, None], 0))

        def verify(c):
            keys, values, views = c
            chunk = jnp.concatenate([tok[:, None], drafts], axis=1)                     # [B, k + 1]
            lg, keys, values, views = _forward(cfg, params, keys, values, chunk, jnp.where(active, 1 + nv, 0),
                                               lens, page_table, None, views)
            m, nxt = accept_rows(lg, drafts, nv, samp, n, q)
            extra = token_logprobs(lg, emitted_of(m, nxt), X) if logprobs else None
            return m, nxt, extra, (keys, values, views)

        def plain(c):
            keys, values, views = c
            lg, keys, values, views = _forward(cfg, params, keys, values, tok[:, None], active.astype(jnp.int32),
                                               lens, page_table, jnp.zeros_like(lens), views)
            nxt = sample_rows(lg[:, 0], samp, n)
            m = jnp.zeros_like(lens)
            extra = None
            if logprobs:   # position 0 only (one token), the rest padding
                pick, top, ids = token_logprobs(lg[:, 0], nxt, X)
                pad = lambda a: jnp.pad(a[:, None], ((0, 0), (0, k)) + ((0, 0),) * (a.ndim - 1))  # noqa: E731
                extra = (pad(pick), pad(top), pad(ids))
            return m, nxt, extra, (keys, values, views)

        m, nxt, extra, (keys, values, views) = jax.lax.cond(jnp.any(nv > 0), verify, plain, (keys, values, views))

        emitted = emitted_of(m, nxt)                                                     # [B, k + 1]
        is_stop = (emitted[..., None] == stops[:, None, :]).any(-1) & (i_k <= m[:, None])
        first = jnp.argmax(is_stop, axis=1)
        c = jnp.where(is_stop.any(1), first + 1, m + 1)
        c = jnp.where(active, jnp.minimum(c, max_n - n), 0)                             # tokens emitted
        hit_stop = is_stop.any(1) & (first + 1 <= c)
        rows = jnp.arange(tok.shape[0])[:, None]
        hist = hist.at[rows, jnp.where(i_k < c[:, None], lens[:, None] + 1 + i_k, hist.shape[1])].set(
            emitted, mode="drop")
        last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
        used = jnp.minimum(m, c)
        tot = (tot[0] + nv, tot[1] + jnp.where(active, used, 0), tot[2] + active.astype(jnp.int32))
        tried = nv > 0
        rate = jnp.where(tried, EMA * rate + (1 - EMA) * used / jnp.maximum(nv, 1), rate)
        low = tried & (rate < plan.min_accept)
        n = n + c
        lens = lens + c                 # pending and the emitted tokens but the last are written
        alive = alive & ~(active & (hit_stop | (n >= max_n)))
        carry = (keys, values, views, dp, jnp.where(c > 0, last, tok), lens, n, alive, hist,
                 jnp.where(low, 2 * plan.min_accept, rate),
                 jnp.where(low, plan.cooldown, jnp.maximum(off - 1, 0)), tot)
        return carry, (emitted, c, extra)

    views = gather_views(keys, values, page_table)
    if draft:
        dkeys, dvalues = dpools
        dp = (dkeys, dvalues, gather_views(dkeys, dvalues, page_table))
    else:
        dp = None
    zeros = jnp.zeros_like(state["lens"])
    init = (keys, values, views, dp, state["tok"], state["lens"], state["n"], state["active"], state["hist"],
            state["rate"], state["off"], (zeros, zeros, zeros))
    carry, (toks, counts, extra) = jax.lax.scan(iteration, init, None, length=steps)
    keys, values, _, dp, tok, lens, n, active, _, rate, off, tot = carry
    out = {"token": toks, "count": counts, "proposed": tot[0], "accepted": tot[1], "forwards": tot[2]}
    if logprobs:
        out["logprob"], out["top"], out["top_ids"] = extra
    final = {"tok": tok, "lens": lens, "n": n, "active": active, "rate": rate, "off": off}
    dpools = None if dp is None else (_pin(dp[0], pool_sharding), _pin(dp[1], pool_sharding))
    return out, final, _pin(keys, pool_sharding), _pin(values, pool_sharding), dpools
