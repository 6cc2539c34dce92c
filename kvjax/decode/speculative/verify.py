"""Speculative verification: which proposed tokens the target model accepts, and the token
that follows them, with the output distribution exactly the target's.

Axis letters: B batch, k proposed tokens, V vocab.

Greedy rows (temperature 0) accept proposal i while it equals the target's argmax after the
tokens before it; the next token is the target's argmax after the accepted run. The tokens
are then exactly plain greedy decoding's.

Sampling rows use the speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023):
p and q are the target's and the proposer's distributions after the same temperature, top-k
and top-p filter; proposal x_i ~ q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i));
at the first rejection the next token is drawn from normalise(max(p_i - q_i, 0)); when every
proposal is accepted (or a row proposed fewer than k), it is drawn from p after the run. A
deterministic proposer (prompt lookup) is a one-hot q. Each emitted token is then distributed
exactly as the target's own sampling would draw it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ...sampling import filter_logits


def target_probs(logits, temperature, top_k, top_p):
    """float32 [B, k + 1, V] sampling distributions of the target's logits [B, k + 1, V] after the
    rows' temperature [B] (0 read as 1: greedy rows do not use these), top-k and top-p."""
    B, T, V = logits.shape
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    flat = (logits.astype(jnp.float32) / t).reshape(B * T, V)
    rep = lambda a: jnp.repeat(a, T)                                    # noqa: E731  [B] -> [B * T]
    return jax.nn.softmax(filter_logits(flat, rep(top_k), rep(top_p)), axis=-1).reshape(B, T, V)


def draft_probs_of(logits, temperature, top_k, top_p):
    """A draft step's q: float32 [B, V] distributions of its logits [B, V] filtered as the
    target's (`target_probs`), or zeros when every row is greedy (q is then never read: no sort)."""
    return jax.lax.cond(jnp.all(temperature <= 0), lambda lg: jnp.zeros(lg.shape, jnp.float32),
                        lambda lg: target_probs(lg[:, None], temperature, top_k, top_p)[:, 0], logits)


def accept(logits, drafts, n_valid, knobs, key, draft_probs=None):
    """(accepted [B], next token [B]).

    logits: the target's float [B, k + 1, V] after the pending token and each proposal (entry i
    predicts the token after proposal i); drafts int32 [B, k]; n_valid int32 [B]: how many
    proposals are real (the rest are never accepted); draft_probs: the proposer's float32
    [B, k, V] (filtered as the target's), or None for a deterministic proposer (one-hot q).
    Rows with temperature 0 verify greedily; the sampling path runs only when a row samples.
    """
    B, k = drafts.shape
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)                           # [B, k + 1]
    valid = jnp.arange(k)[None, :] < n_valid[:, None]                                 # [B, k]
    g_ok = valid & (drafts == argmax[:, :k])
    g_acc = jnp.sum(jnp.cumprod(g_ok.astype(jnp.int32), axis=1), axis=1)             # leading run
    g_next = jnp.take_along_axis(argmax, g_acc[:, None], axis=1)[:, 0]
    greedy = knobs.temperature <= 0

    def sampled(_):
        p = target_probs(logits, knobs.temperature, knobs.top_k, knobs.top_p)        # [B, k + 1, V]
        p_x = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]     # [B, k]
        if draft_probs is None:
            q_x = jnp.ones_like(p_x)
        else:
            q_x = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        k_u, k_draw = jax.random.split(key)
        u = jax.random.uniform(k_u, (B, k))
        ok = valid & (u * q_x < p_x)                                 # u < min(1, p/q), q > 0 where drawn
        acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        p_at = jnp.take_along_axis(p, acc[:, None, None], axis=1)[:, 0]              # [B, V]
        rejected = acc < n_valid                                     # stopped at a real proposal
        x = jnp.take_along_axis(drafts, jnp.minimum(acc, k - 1)[:, None], axis=1)[:, 0]
        if draft_probs is None:
            q_at = jax.nn.one_hot(x, p.shape[-1], dtype=p.dtype)
        else:
            q_at = jnp.take_along_axis(draft_probs, jnp.minimum(acc, k - 1)[:, None, None], axis=1)[:, 0]
        resid = jnp.maximum(p_at - q_at, 0.0)
        resid_ok = jnp.sum(resid, axis=-1, keepdims=True) > 0
        dist = jnp.where(rejected[:, None] & resid_ok, resid, p_at)
        nxt = jax.random.categorical(k_draw, jnp.log(dist), axis=-1).astype(jnp.int32)
        return jnp.where(greedy, g_acc, acc), jnp.where(greedy, g_next, nxt)

    return jax.lax.cond(jnp.all(greedy), lambda _: (g_acc, g_next), sampled, None)
