"""cache_vs_nocache: the KV cache's claim, measured.

Two sweeps on a preset shape with random weights (weights do not change the cost):

1. Per-token latency at sequence length n (`seq_lens`): the cost of producing the
   token after n tokens.
   * cached: one `kvjax.decode_step` (check=False) on a cache of max_len n holding
     n-1 tokens: Q/K/V for the new token only, attention over n slots;
   * no cache: one jitted full pass of the same model over all n tokens, logits at the
     last position only: exactly what `generate(use_cache=False)` runs for each token.
   Each call of the cached step rewinds the rows to n - 1 tokens, so every timed step
   is the same step (`kvjax.bench.time_decode_step`).
2. Total generation time (`generate_lens`): `kvjax.generate(..., use_cache=True/False)`
   of n - prompt_len new tokens after a prompt of prompt_len tokens, greedy; the tokens
   of both paths must be identical, or the run fails.

Every figure is the median of `step_repeats` / `gen_repeats` warm measurements, each
calibrated to last `min_seconds` (`kvjax.timing`); compilation is reported apart. Weights
are random with std 0.2 (decisive top logits: the two paths' greedy tokens cannot differ
by a float near-tie, so a mismatch is a bug), which does not change the cost.

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
from kvjax.bench import time_decode_step
from kvjax.timing import measure

from .. import plots
from ..models import ShapeConfig, model_config, random_params, random_tokens
from ..schema import ConfigError, option


@dataclass(frozen=True)
class Config(ShapeConfig):
    batch_size: int = option(1, help="rows generated together", min=1)
    seq_lens: tuple[int, ...] = option((64, 128, 256, 512, 1024, 2048), min=2, min_items=1,
                                       help="sequence lengths n for the per-token latency sweep")
    step_repeats: int = option(5, min=1, help="timed measurements per length in the per-token sweep (median)")
    generate_lens: tuple[int, ...] = option((64, 128, 256, 512), min=2,
                                            help="total lengths (prompt + new tokens) for the "
                                                 "full-generation sweep; [] skips it")
    prompt_len: int = option(16, min=1, help="prompt tokens in the full-generation sweep")
    gen_repeats: int = option(3, min=1, help="timed measurements of generate per length and path (median)")
    min_seconds: float = option(0.2, min=0.0, help="calibrated length of one measurement (s)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("cache_vs_nocache", c, run_cfg.dtype)
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


def run(ctx, c: Config) -> dict:
    cfg = model_config("cache_vs_nocache", c, ctx.dtype)
    params = random_params(cfg, ctx.seed, std=0.2)
    B = c.batch_size
    ctx.note(f"Model: {cfg.name} shape (d_model={cfg.d_model}, layers={cfg.num_layers}, "
             f"heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}), "
             f"random weights (std 0.2), {cfg.dtype}, batch {B}. Times are medians of calibrated "
             f"measurements of >= {c.min_seconds} s after a compile call; "
             f"attention scores are per row, per head, per layer.")
    step_rows = _per_token_sweep(ctx, c, cfg, params)
    gen_rows = _generate_sweep(ctx, c, cfg, params)
    _plot(ctx, cfg, B, step_rows, gen_rows)
    return _headline(ctx, cfg, B, step_rows, gen_rows)


def _per_token_sweep(ctx, c: Config, cfg, params) -> list[dict]:
    """1. Per-token latency at length n: one cached decode step against one full pass."""
    B, kw = c.batch_size, dict(min_seconds=c.min_seconds)
    step_rows = []
    for n in ctx.track(c.seq_lens, "per-token latency, n ="):
        cache, cached = time_decode_step(cfg, params, kvjax.init_cache(cfg, B, n), n - 1, ctx.seed + n,
                                         repeats=c.step_repeats, **kw)
        slots = cache.max_len
        toks = jnp.asarray(random_tokens(cfg, ctx.seed + n, (B, n)))
        _, nocache = measure(lambda _: _nocache_next_logits(cfg, params, toks), repeats=c.step_repeats, **kw)
        T = toks.shape[1]
        valid = cached.valid and nocache.valid
        row = {"sweep": "per_token", "seq_len": n, "batch_size": B,
               **cached.fields("cached"), **nocache.fields("nocache"),
               "ratio": nocache.median_s / cached.median_s if valid else None, "valid": valid,
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
    return step_rows


def _generate_sweep(ctx, c: Config, cfg, params) -> list[dict]:
    """2. Total generation time with and without the cache; the greedy tokens must match."""
    B, P, kw = c.batch_size, c.prompt_len, dict(min_seconds=c.min_seconds)
    gen_rows = []
    prompt = random_tokens(cfg, ctx.seed, (B, P))
    for n in ctx.track(c.generate_lens, "full generation, n ="):
        new = n - P
        out_c, tc = measure(lambda _: kvjax.generate(cfg, params, prompt, max_new_tokens=new).tokens,
                            repeats=c.gen_repeats, **kw)
        out_n, tn = measure(lambda _: kvjax.generate(cfg, params, prompt, max_new_tokens=new,
                                                     use_cache=False).tokens, repeats=c.gen_repeats, **kw)
        valid = tc.valid and tn.valid
        match = bool(np.array_equal(np.asarray(out_c), np.asarray(out_n)))
        lens = range(P + 1, n + 1)  # context length once each new token is in place
        row = {"sweep": "generate", "seq_len": n, "prompt_len": P, "new_tokens": new,
               "batch_size": B, "cached_s": tc.median_s, "nocache_s": tn.median_s,
               "cached_first_s": tc.first_s, "nocache_first_s": tn.first_s,
               "cached_tok_s": B * new / tc.median_s, "nocache_tok_s": B * new / tn.median_s,
               "speedup": tn.median_s / tc.median_s if valid else None, "valid": valid,
               "invalid_reason": "; ".join(r for r in (tc.reason, tn.reason) if r) or None,
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
    return gen_rows


def _headline(ctx, cfg, B: int, step_rows, gen_rows) -> dict:
    """The summary (growth from the shortest to the longest n, tokens identical) and its notes."""
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
    invalid = [r for r in step_rows + gen_rows if not r["valid"]]
    headline["invalid_rows"] = len(invalid)
    headline["ok"] = headline.get("tokens_match", True)   # timing noise never fails a run; wrong tokens do
    if invalid:
        ctx.note(f"{len(invalid)} row(s) INVALID (left out of the ratios): " + "; ".join(
            f"{r['sweep']} n={r['seq_len']}: {r.get('invalid_reason') or r.get('cached_invalid_reason') or r.get('nocache_invalid_reason')}"
            for r in invalid))
    if gen_rows and not headline["tokens_match"]:
        bad = [r["seq_len"] for r in gen_rows if not r["tokens_match"]]
        ctx.note(f"CHECK FAILED: cached and no-cache greedy tokens differ at n = {bad}. The weights "
                 f"(std 0.2) give decisive logits, so this is a bug, not a float near-tie.")
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
