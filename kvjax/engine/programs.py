"""The engine's two compiled programs: a prefill chunk and k decode steps, over paged pools.

Axis letters: B rows of this call, T chunk width, W pages per row, V vocab, L layers,
X top log-probabilities returned (LOGPROBS_MAX), E stop ids per row.

Both run the model's one forward path (`Transformer`) with a KVCache of kind "paged"
(kvjax/cache/paged.py) and take the pools donated, so XLA writes new K/V into the pool's
own memory.
Rows are requests, not fixed slots: the host picks which requests run, so a call's batch
is only as wide as the work (bucketed to powers of two to bound compilations).

Sampling: each row draws with its own key, fold_in(key(seed), token index), through
`kvjax.sampling.sample`, so a request's tokens do not depend on what else is in flight.
When every row is greedy the draw is skipped at run time (one argmax, as `generate`).
Logit controls (penalties, logit bias, min_p, min_tokens: kvjax/controls.py) are compiled in
only when a row of the call uses them (the sampling dict then holds their arrays and the
rows' token counts, carried through the steps and returned for a chained call).
Log-probabilities are compiled in only when a row asks for them (static flags).

Compilations: each program's body counts its traces (`trace_count`, per thread). jit traces
a program once for every new combination of shapes and static arguments, and each trace is
compiled, so the count of new traces around a call is the count of programs it compiled.
"""
from __future__ import annotations

import threading
from functools import partial

import jax
import jax.numpy as jnp

from ..model import Transformer
from ..controls import CONTROL_FIELDS, Controls, apply_controls, count_tokens
from ..sampling import greedy, sample
from ..structured.device import mask_logits
from ..cache.attend import CacheWrite
from ..cache.paged import gather_views, paged_cache

LOGPROBS_MAX = 20   # most alternatives a request may ask for (OpenAI's limit)

_traces = threading.local()   # jit traces on the calling thread: an engine's loop counts its own


def trace_count() -> int:
    """How many times this thread has traced (so compiled) prefill_chunk or decode_steps."""
    return getattr(_traces, "n", 0)


def count_trace():
    """Called in a program's body, so it runs once per trace (not once per call)."""
    _traces.n = trace_count() + 1


def pin_pools(pools, sharding):
    """Keep the pools in their placement across calls (a mesh: pages replicated, kv heads split)."""
    return pools if sharding is None else tuple(jax.lax.with_sharding_constraint(p, sharding) for p in pools)


def forward_pages(cfg, params, keys, values, tokens, lengths, starts, page_table, logits_at, views=()):
    """tokens [B, T] appended at starts [B] -> (logits, new key pools, new value pools, new
    views (when given: dense copies of the rows' pages, see paged.paged_cache))."""
    T = tokens.shape[1]
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cache = paged_cache(keys, values, starts, page_table, views)
    logits, layers = Transformer(cfg).apply({"params": params}, tokens, positions, lengths, cache,
                                            CacheWrite(starts), logits_at=logits_at)
    new_views = tuple(l["view"] for l in layers) if views else ()
    return logits, tuple(l["k"] for l in layers), tuple(l["v"] for l in layers), new_views


def controlled(samp) -> bool:
    """Whether a call's sampling settings carry logit controls (kvjax/controls.py): then
    samp also holds their arrays, the rows' token counts [B, V] and stop ids [B, E]."""
    return "bias" in samp


def sample_rows(logits, samp, index, counts=None):
    """One token per row [B] from logits [B, V], each row with its own key and settings.

    samp: temperature, top_k, top_p, seed (uint32) per row [B], and the logit controls'
    arrays when `controlled(samp)`; index [B]: the token's index in its request (folded into
    the request's key); counts int32 [B, V]: the tokens each row generated so far (controls)."""
    min_p = None
    if controlled(samp):
        ctl = Controls(**{f: samp[f] for f in CONTROL_FIELDS})
        logits = apply_controls(logits, ctl, counts, index, samp["stops"])
        min_p = samp["min_p"]
    if "grammar" in samp:                     # structured output: the grammar's allowed tokens only
        logits = mask_logits(logits, samp["grammar"])

    def draw(lg):
        def one(l, seed, i, t, k, p, mp):
            key = jax.random.fold_in(jax.random.key(seed), i)
            return sample(l[None], key, t[None], k[None], p[None], None if mp is None else mp[None])[0]
        return jax.vmap(one)(lg, samp["seed"], index, samp["temperature"], samp["top_k"], samp["top_p"], min_p)

    return jax.lax.cond(jnp.all(samp["temperature"] <= 0), greedy, draw, logits)


def token_logprobs(logits, chosen, width: int):
    """(log p(chosen) [...], top log-probs [..., X], their ids [..., X]) from logits [..., V]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    pick = jnp.take_along_axis(lp, jnp.clip(chosen, 0, lp.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    top, ids = jax.lax.top_k(lp, width)
    return pick, top, ids.astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 10, 11, 12), donate_argnums=(2, 3))
def prefill_chunk(cfg, params, keys, values, tokens, lengths, starts, page_table, samp, index,
                  logprobs: bool, prompt_logprobs: bool, pool_sharding=None):
    """Append one chunk per row and sample the token after it.

    tokens [B, T] (right-padded), lengths [B] real tokens (0: an idle row), starts [B]
    tokens the row already holds, page_table [B, W], samp: per-row sampling settings plus
    "targets" [B, T] (the prompt token after each position, for prompt_logprobs), index [B]
    the index of the token to sample; pool_sharding (static): the pools' placement on a
    mesh, kept. The sampled token is meaningful only for rows whose
    chunk ends their prompt. Returns (outputs dict, key pools, value pools).
    """
    count_trace()
    V = cfg.vocab_size
    last = jnp.maximum(lengths - 1, 0)
    logits, keys, values, _ = forward_pages(cfg, params, keys, values, tokens, lengths, starts, page_table,
                                       None if prompt_logprobs else last)
    if prompt_logprobs:
        every = logits                                                           # [B, T, V]
        logits = jnp.take_along_axis(every, last[:, None, None], axis=1)
    logits = logits[:, 0]                                                        # [B, V]
    tok = sample_rows(logits, samp, index, samp.get("counts"))
    out = {"token": tok}
    if logprobs:
        out["logprob"], out["top"], out["top_ids"] = token_logprobs(logits, tok, min(LOGPROBS_MAX, V))
    if prompt_logprobs:
        out["p_logprob"], out["p_top"], out["p_top_ids"] = token_logprobs(every, samp["targets"],
                                                                           min(LOGPROBS_MAX, V))
    return out, pin_pools(keys, pool_sharding), pin_pools(values, pool_sharding)


@partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=(2, 3))
def decode_steps(cfg, params, keys, values, state, page_table, steps: int, logprobs: bool,
                 pool_sharding=None):
    """`steps` decode steps for every row in one `lax.scan` (one host round trip).

    state: tok [B] (the last sampled token, not yet in the cache), lens [B] (tokens in the
    cache), n [B] (tokens generated so far), active [B], max_n [B] (generation cap),
    stops [B, E] (stop token ids, -1 padded) and the per-row sampling settings. A step feeds
    tok, samples token n and stops the row on a stop token or at max_n; a stopped row writes
    nothing more. Returns (tokens [steps, B], emitted [steps, B] bool, logprob outputs or
    None, the final tok/lens/n/active (a next call can continue from them), key pools,
    value pools).
    """
    count_trace()
    samp = {k: state[k] for k in ("temperature", "top_k", "top_p", "seed")}
    if controlled(state):
        samp.update({k: state[k] for k in (*CONTROL_FIELDS, "stops")})
    if "grammar" in state:
        samp["grammar"] = state["grammar"]
    V = cfg.vocab_size

    def step(carry, _):
        keys, values, views, tok, lens, n, active, counts = carry
        logits, keys, values, views = forward_pages(cfg, params, keys, values, tok[:, None], active.astype(jnp.int32),
                                               lens, page_table, jnp.zeros_like(lens), views)
        logits = logits[:, 0]
        new = sample_rows(logits, samp, n, counts)
        emitted = active
        if counts is not None:
            counts = count_tokens(counts, new, emitted)
        n = n + active
        lens = lens + active
        stop = jnp.any(new[:, None] == state["stops"], axis=-1)
        active = active & ~(stop | (n >= state["max_n"]))
        tok = jnp.where(emitted, new, tok)
        extra = token_logprobs(logits, new, min(LOGPROBS_MAX, V)) if logprobs else None
        return (keys, values, views, tok, lens, n, active, counts), (new, emitted, extra)

    # The rows' pages are copied out once per call (not once per step): each step writes its
    # token into the pool and into this copy and attends over the copy.
    views = gather_views(keys, values, page_table)
    init = (keys, values, views, state["tok"], state["lens"], state["n"], state["active"], state.get("counts"))
    (keys, values, _, tok, lens, n, active, counts), (toks, emitted, extra) = jax.lax.scan(step, init, None,
                                                                                            length=steps)
    final = {"tok": tok, "lens": lens, "n": n, "active": active}
    if counts is not None:
        final["counts"] = counts
    return toks, emitted, extra, final, pin_pools(keys, pool_sharding), pin_pools(values, pool_sharding)
