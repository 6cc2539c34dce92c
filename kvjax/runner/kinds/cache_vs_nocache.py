"""cache_vs_nocache: the KV cache's claim, measured.

Two sweeps on a preset shape with random weights (weights do not change the cost):

1. Per-token latency at sequence length n (`seq_lens`): the cost of producing the
   token after n tokens.
   * cached: one `kvjax.decode_step` (check=False) on a cache of max_len n holding
     n-1 tokens: Q/K/V for the new token only, attention over n slots;
   * no cache: one jitted full pass of the same model over all n tokens, logits at the
     last position only: exactly what `generate(use_cache=False)` runs for each token.
   Median of `step_repeats` calls after a compile call (reported separately).
2. Total generation time (`generate_lens`): `kvjax.generate(..., use_cache=True/False)`
   of n - prompt_len new tokens after a prompt of prompt_len tokens, greedy; median of
   `gen_repeats` calls after a warm-up call; the tokens of both paths are compared.

Attention-score counts are per row, per head, per layer, computed from the lengths
actually run: "needed" counts causally visible (query, key) pairs, about n for a cached
token and n(n+1)/2 for an uncached one; "computed" counts what the kernels evaluate
(the cache attends over all of its max_len slots, masked; a full pass forms the whole
T x T score matrix, masked).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import kvjax

from .. import plots
from ..models import ShapeConfig, model_config, random_params, random_tokens
from ..schema import ConfigError, option
from ..timing import Timing, measure, timed


@dataclass(frozen=True)
class Config(ShapeConfig):
    batch_size: int = option(1, help="rows generated together", min=1)
    seq_lens: tuple[int, ...] = option((64, 128, 256, 512, 1024, 2048), min=2, min_items=1,
                                       help="sequence lengths n for the per-token latency sweep")
    step_repeats: int = option(10, min=1, help="timed calls per length in the per-token sweep (median)")
    generate_lens: tuple[int, ...] = option((64, 128, 256, 512), min=2,
                                            help="total lengths (prompt + new tokens) for the "
                                                 "full-generation sweep; [] skips it")
    prompt_len: int = option(16, min=1, help="prompt tokens in the full-generation sweep")
    gen_repeats: int = option(3, min=1, help="timed generate calls per length and path (median)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("cache_vs_nocache", c, run_cfg.dtype)
    for i, n in enumerate(c.seq_lens):
        if n < c.step_repeats + 2:
            raise ConfigError(f"cache_vs_nocache.seq_lens[{i}]: {n} is too short for step_repeats="
                              f"{c.step_repeats}; allowed: lengths >= step_repeats + 2 "
                              f"(the timed decode steps must fit in the cache)")
    for i, n in enumerate(c.generate_lens):
        if n <= c.prompt_len:
            raise ConfigError(f"cache_vs_nocache.generate_lens[{i}]: {n} leaves no new tokens after "
                              f"prompt_len={c.prompt_len}; allowed: lengths > prompt_len")
    longest = max((*c.seq_lens, *c.generate_lens))
    if cfg.positions == "learned" and longest > cfg.max_position:
        raise ConfigError(f"cache_vs_nocache.seq_lens: length {longest} exceeds the learned position "
                          f"table (max_position={cfg.max_position}); raise it with "
                          f"model: {{max_position: {longest}}} or use shorter lengths")


@partial(jax.jit, static_argnums=0)
def _nocache_next_logits(cfg, params, tokens):
    """The no-cache cost of one token: a full causal pass over tokens [B, T] -> logits [B, V]."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    lengths = jnp.full((B,), T, jnp.int32)
    logits, _ = kvjax.Transformer(cfg).apply({"params": params}, tokens, positions, lengths,
                                             logits_at=lengths - 1)
    return logits[:, 0]


def _time_cached_step(cfg, params, B, n, repeats, seed):
    """Decode steps on a cache of n slots, the last one filling slot n; returns (Timing, slots)."""
    cache = kvjax.init_cache(cfg, B, n)
    fill = n - 1 - repeats
    _, cache = kvjax.prefill(cfg, params, random_tokens(cfg, seed, (B, fill)),
                             np.full((B,), fill, np.int32), cache)
    tok = jnp.asarray(random_tokens(cfg, seed + 1, (B,)))
    (_, cache), first = timed(kvjax.decode_step, cfg, params, tok, cache, check=False)
    t = Timing(first)
    for _ in range(repeats):
        (_, cache), s = timed(kvjax.decode_step, cfg, params, tok, cache, check=False)
        t.times.append(s)
    final = np.asarray(cache.lengths)
    assert (final == n).all(), f"cache should end full at {n}, got lengths {final}"
    return t, cache.max_len


def run(ctx, c: Config) -> dict:
    cfg = model_config("cache_vs_nocache", c, ctx.dtype)
    params = random_params(cfg, ctx.seed)
    B = c.batch_size
    ctx.note(f"Model: {cfg.name} shape (d_model={cfg.d_model}, layers={cfg.num_layers}, "
             f"heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}), "
             f"random weights, {cfg.dtype}, batch {B}. Times are medians after a compile call; "
             f"attention scores are per row, per head, per layer.")

    # --- 1. per-token latency at length n
    step_rows = []
    for n in ctx.track(c.seq_lens, "per-token latency, n ="):
        cached, slots = _time_cached_step(cfg, params, B, n, c.step_repeats, ctx.seed + n)
        toks = jnp.asarray(random_tokens(cfg, ctx.seed + n, (B, n)))
        _, nocache = measure(lambda: _nocache_next_logits(cfg, params, toks), c.step_repeats)
        T = toks.shape[1]
        row = {"sweep": "per_token", "seq_len": n, "batch_size": B,
               "cached_ms": 1e3 * cached.median_s, "nocache_ms": 1e3 * nocache.median_s,
               "ratio": nocache.median_s / cached.median_s,
               "cached_compile_s": cached.compile_s, "nocache_compile_s": nocache.compile_s,
               "scores_cached_needed": n, "scores_cached_computed": slots,
               "scores_nocache_needed": T * (T + 1) // 2, "scores_nocache_computed": T * T}
        ctx.log(row)
        step_rows.append(row)
    ctx.table("Per-token latency: producing the token after n tokens",
              ["n", "cached ms", "no-cache ms", "no-cache / cached", "scores cached (needed)",
               "scores no-cache (needed)", "scores cached (computed)", "scores no-cache (computed)"],
              [[r["seq_len"], r["cached_ms"], r["nocache_ms"], r["ratio"], r["scores_cached_needed"],
                r["scores_nocache_needed"], r["scores_cached_computed"], r["scores_nocache_computed"]]
               for r in step_rows])

    # --- 2. total generation time
    gen_rows = []
    P = c.prompt_len
    prompt = random_tokens(cfg, ctx.seed, (B, P))
    for n in ctx.track(c.generate_lens, "full generation, n ="):
        new = n - P
        out_c, tc = measure(lambda: kvjax.generate(cfg, params, prompt, max_new_tokens=new).tokens,
                            c.gen_repeats)
        out_n, tn = measure(lambda: kvjax.generate(cfg, params, prompt, max_new_tokens=new,
                                                   use_cache=False).tokens, c.gen_repeats)
        match = bool(np.array_equal(np.asarray(out_c), np.asarray(out_n)))
        lens = range(P + 1, n + 1)  # context length once each new token is in place
        row = {"sweep": "generate", "seq_len": n, "prompt_len": P, "new_tokens": new,
               "batch_size": B, "cached_s": tc.median_s, "nocache_s": tn.median_s,
               "cached_first_s": tc.first_s, "nocache_first_s": tn.first_s,
               "cached_tok_s": B * new / tc.median_s, "nocache_tok_s": B * new / tn.median_s,
               "speedup": tn.median_s / tc.median_s,
               # cached: prefill's causal pairs, then one row of m scores per decoded token;
               # no cache: every token re-forms its whole prefix's causal score triangle.
               "scores_cached_needed": P * (P + 1) // 2 + sum(lens),
               "scores_nocache_needed": sum((m - 1) * m // 2 for m in lens),
               "tokens_match": match}
        ctx.log(row)
        gen_rows.append(row)
    if gen_rows:
        ctx.table(f"Full generation: prompt {P} tokens + (n - {P}) new tokens, greedy",
                  ["n", "cached s", "no-cache s", "speedup", "cached tok/s", "no-cache tok/s",
                   "scores cached (needed)", "scores no-cache (needed)", "tokens identical"],
                  [[r["seq_len"], r["cached_s"], r["nocache_s"], r["speedup"], r["cached_tok_s"],
                    r["nocache_tok_s"], r["scores_cached_needed"], r["scores_nocache_needed"],
                    r["tokens_match"]] for r in gen_rows])

    _plot(ctx, cfg, B, step_rows, gen_rows)
    first, last = step_rows[0], step_rows[-1]
    headline = {
        "model": cfg.name, "batch_size": B,
        "per_token": {"n": [r["seq_len"] for r in step_rows],
                      "cached_ms": [r["cached_ms"] for r in step_rows],
                      "nocache_ms": [r["nocache_ms"] for r in step_rows]},
        "cached_step_growth": last["cached_ms"] / first["cached_ms"],
        "nocache_step_growth": last["nocache_ms"] / first["nocache_ms"],
        "length_growth": last["seq_len"] / first["seq_len"],
    }
    if gen_rows:
        headline["generate_speedup_at_longest"] = gen_rows[-1]["speedup"]
        headline["tokens_match"] = all(r["tokens_match"] for r in gen_rows)
    ctx.note(f"From n={first['seq_len']} to n={last['seq_len']} ({headline['length_growth']:.0f}x longer) "
             f"the cached step went {first['cached_ms']:.3g} -> {last['cached_ms']:.3g} ms "
             f"({headline['cached_step_growth']:.2g}x) and the no-cache token "
             f"{first['nocache_ms']:.3g} -> {last['nocache_ms']:.3g} ms ({headline['nocache_step_growth']:.3g}x).")
    if gen_rows and not headline["tokens_match"]:
        ctx.note("Note: cached and no-cache greedy tokens differ for some length. With random "
                 "weights the logits are nearly flat, so float reduction order can flip a near-tie; "
                 "kvjax's equivalence tests check the logits themselves.")
    return headline


def _plot(ctx, cfg, B, step_rows, gen_rows):
    fig, axes = plots.figure(ncols=2 if gen_rows else 1)
    n = [r["seq_len"] for r in step_rows]
    plots.lines(axes[0], n, {"no cache (full pass over n tokens)": [r["nocache_ms"] for r in step_rows],
                             "KV cache (one decode step)": [r["cached_ms"] for r in step_rows]},
                xlabel="sequence length n (tokens)", ylabel="ms per token (median)",
                title=f"Cost of one new token, {cfg.name} shape, batch {B}", logx=True, logy=True)
    if gen_rows:
        g = [r["seq_len"] for r in gen_rows]
        plots.lines(axes[1], g, {"no cache": [r["nocache_s"] for r in gen_rows],
                                 "KV cache": [r["cached_s"] for r in gen_rows]},
                    xlabel="total length n (prompt + generated)", ylabel="seconds (median)",
                    title=f"Generating n - {gen_rows[0]['prompt_len']} tokens", logx=True, logy=True)
    ctx.save_figure(fig, "cache_vs_nocache.png")
