"""quickstart: the README's first job, on the bundled trained model (no download).

Greedy generation for a few prompts, once with the KV cache and once without
(`kvjax.generate(..., use_cache=True/False)`, the same model and inputs). The run
checks that both paths produce identical tokens, prints the text, the tokens/s of each
path (median of `repeats` warm measurements, each calibrated to last `min_seconds`;
the first call, compile included, is shown apart; `kvjax.timing`) and
the speedup, and the KV cache size (allocated `KVCache.nbytes` beside the
`kvjax.cache_bytes` prediction).

`source: preset` runs the same code on random weights of a preset shape with the byte
tokenizer (text is then noise); it exists for tests and for shapes without weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

import kvjax
from kvjax.timing import measure

from .. import plots
from ..models import ShapeConfig, model_config, random_params
from ..schema import ConfigError, option


@dataclass(frozen=True)
class Config:
    source: str = option("preset", choices=("bundled", "preset"),
                         help="bundled: a trained model shipped with kvjax; preset: random weights")
    model: str = option("llama-tiny", help="bundled model name (source: bundled) or preset name "
                                           "(source: preset)")
    prompts: tuple[str, ...] = option(("The cache", "def main():"), min_items=1,
                                      help="prompts, generated together as one ragged batch")
    max_new_tokens: int = option(48, min=1, help="tokens generated per prompt")
    stop_at_eos: bool = option(True, help="stop a row at the tokenizer's end-of-sequence token")
    repeats: int = option(3, min=1, help="timed measurements of generate per path (median)")
    min_seconds: float = option(0.2, min=0.0, help="calibrated length of one measurement (s)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    if c.source == "preset":
        model_config("quickstart", ShapeConfig(preset=c.model), run_cfg.dtype)
    else:
        from kvjax.bundled import bundled_names

        names = bundled_names()
        if c.model not in names:
            import difflib

            close = difflib.get_close_matches(c.model, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"quickstart.model: no bundled model {c.model!r}{hint}; bundled "
                              f"models: {', '.join(names) or 'none installed'}")
    for i, p in enumerate(c.prompts):
        if not p:
            raise ConfigError(f"quickstart.prompts[{i}]: empty prompt; allowed: non-empty text")


def load_model(c: Config, dtype: str, seed: int):
    """(cfg, params, tokenizer) for the configured source, in the run's dtype."""
    if c.source == "bundled":
        from kvjax.bundled import load_bundled

        try:
            cfg, params, tok = load_bundled(c.model, dtype=dtype)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ConfigError(f"quickstart.model: {e}") from None
    else:
        from kvjax.tokenizer import ByteTokenizer

        cfg = model_config("quickstart", ShapeConfig(preset=c.model), dtype)
        params, tok = random_params(cfg, seed), ByteTokenizer()
        if cfg.vocab_size < tok.vocab_size:
            raise ConfigError(f"quickstart.model: preset {c.model!r} has vocab_size {cfg.vocab_size} "
                              f"< {tok.vocab_size} of the byte tokenizer")
    if cfg.dtype != dtype:
        cfg = cfg.replace(dtype=dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return cfg, params, tok


def run(ctx, c: Config) -> dict:
    cfg, params, tok = load_model(c, ctx.dtype, ctx.seed)
    tokens, lengths, pad = _prompt_batch(c, cfg, tok)
    B, N = tokens.shape[0], c.max_new_tokens
    eos = tok.eos_id if c.stop_at_eos else None
    ctx.note(f"Model: {c.model} ({c.source}; {kvjax.param_count(params):,} parameters, "
             f"{cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, {cfg.dtype}). "
             f"{B} prompts, up to {N} new tokens each, greedy.")

    def gen(use_cache):
        return lambda: kvjax.generate(cfg, params, tokens, lengths, max_new_tokens=N,
                                      eos_token_id=eos, use_cache=use_cache,
                                      pad_token_id=pad)

    results = {}
    for label, use_cache in ctx.track([("with cache", True), ("without cache", False)], "generate"):
        out, t = measure(lambda _, g=gen(use_cache): g(), repeats=c.repeats, min_seconds=c.min_seconds)
        results[label] = (out, t)
    (out_c, t_c), (out_n, t_n) = results["with cache"], results["without cache"]
    identical = _log_outputs(ctx, c, tok, lengths, out_c, out_n)
    generated = int(np.asarray(out_c.lengths).sum())
    tps_c, tps_n = generated / t_c.median_s, generated / t_n.median_s
    timing_ok = t_c.valid and t_n.valid
    speedup = t_n.median_s / t_c.median_s if timing_ok else None
    cache = out_c.cache
    predicted = kvjax.cache_bytes(cfg, B, cache.max_len, cache.dtype)
    _timing_report(ctx, t_c, t_n, generated, tps_c, tps_n)
    _notes(ctx, cfg, cache, B, predicted, identical, speedup, (t_c, t_n), (tps_c, tps_n))

    fig, axes = plots.figure()
    plots.bars(axes[0], ["with cache", "without cache"], [tps_c, tps_n], ylabel="tokens/s (median)",
               title=f"{c.model}: {B} prompts x {N} tokens"
               + (f", speedup {speedup:.2f}x" if timing_ok else ", timing invalid"))
    ctx.save_figure(fig, "quickstart.png")
    return {"ok": identical, "tokens_identical": identical, "model": c.model, "source": c.source,
            "generated_tokens": generated, "cached_tokens_per_s": tps_c,
            "nocache_tokens_per_s": tps_n, "speedup": speedup,
            "cached_first_call_s": t_c.first_s, "nocache_first_call_s": t_n.first_s,
            "kv_cache_bytes": cache.nbytes, "kv_cache_bytes_predicted": predicted}


def _prompt_batch(c: Config, cfg, tok):
    """(tokens int32 [B, S] right-padded, lengths int32 [B], pad id) of the prompts."""
    ids = [tok.encode(p) for p in c.prompts]
    B, S, N = len(ids), max(len(x) for x in ids), c.max_new_tokens
    pad = tok.pad_id if tok.pad_id is not None else 0
    tokens = np.full((B, S), pad, np.int32)
    for b, x in enumerate(ids):
        tokens[b, :len(x)] = x
    lengths = np.array([len(x) for x in ids], np.int32)
    if cfg.positions == "learned" and S + N > cfg.max_position:
        raise ConfigError(f"quickstart.max_new_tokens: the longest prompt ({S} tokens) + {N} exceeds "
                          f"the model's max_position={cfg.max_position}")
    return tokens, lengths, pad


def _log_outputs(ctx, c: Config, tok, lengths, out_c, out_n) -> bool:
    """One note and one row per prompt; returns whether both paths gave the same tokens."""
    toks_c, toks_n = np.asarray(out_c.tokens), np.asarray(out_n.tokens)
    lens_c, lens_n = np.asarray(out_c.lengths), np.asarray(out_n.lengths)
    for b, prompt in enumerate(c.prompts):
        text = tok.decode(toks_c[b, :lens_c[b]].tolist())
        ctx.note(f"[{b}] {prompt!r} -> {text!r}")
        ctx.log({"row": b, "prompt": prompt, "prompt_tokens": int(lengths[b]),
                 "generated_tokens": int(lens_c[b]), "text": text,
                 "identical": bool(np.array_equal(toks_c[b], toks_n[b]) and lens_c[b] == lens_n[b])})
    return bool(np.array_equal(toks_c, toks_n) and np.array_equal(lens_c, lens_n))


def _timing_report(ctx, t_c, t_n, generated: int, tps_c: float, tps_n: float) -> None:
    for label, t, tps in (("with cache", t_c, tps_c), ("without cache", t_n, tps_n)):
        ctx.log({"path": label, "first_call_s": t.first_s, "median_s": t.median_s, "min_s": t.min_s,
                 "spread_s": t.spread_s, "calls": t.calls, "compiles": t.compiles,
                 "tokens": generated, "tokens_per_s": tps, "valid": t.valid, "invalid_reason": t.reason or None})
    ctx.table("Generation with and without the KV cache",
              ["path", "first call s (compile + run)", "median s", "tokens", "tokens/s"],
              [["with cache", t_c.first_s, t_c.median_s, generated, tps_c],
               ["without cache", t_n.first_s, t_n.median_s, generated, tps_n]])


def _notes(ctx, cfg, cache, B: int, predicted: int, identical: bool, speedup, timings, tps) -> None:
    """Tokens identical and the speedup (or why the timing is invalid), and the cache's bytes."""
    (t_c, t_n), (tps_c, tps_n) = timings, tps
    per_token = kvjax.cache_bytes(cfg, 1, 2, cache.dtype) - kvjax.cache_bytes(cfg, 1, 1, cache.dtype)
    if speedup is not None:
        ctx.note(f"Tokens identical: {'yes' if identical else 'NO'}. Speedup from the cache: {speedup:.2f}x "
                 f"({tps_c:,.0f} vs {tps_n:,.0f} tokens/s; first calls, compile included, shown apart).")
    else:
        ctx.note(f"Tokens identical: {'yes' if identical else 'NO'}. Timing INVALID, no speedup given: "
                 f"{'; '.join(r for r in (t_c.reason, t_n.reason) if r)}")
    ctx.note(f"KV cache: {cache.nbytes:,} bytes allocated ({cache.nbytes / 2**20:.2f} MiB; "
             f"kvjax.cache_bytes predicts {predicted:,}) for batch {B} x {cache.max_len} slots, "
             f"{per_token:,} bytes per cached token per row, {cache.dtype}.")
    if not identical:
        ctx.note("CHECK FAILED: the cached and uncached paths produced different tokens.")
