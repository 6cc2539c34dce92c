"""Decode benchmark: cached vs no-cache generation, batch scaling, and transformers on the same shape.

    python benchmarks/decode_bench.py                       # CPU-sized defaults
    python benchmarks/decode_bench.py --preset llama-1b --dtype bfloat16 --new-tokens 128 \
        --prompt-lens 128 512 1024 --batches 1 8 32           # an accelerator

Prints three tables on whatever backend JAX runs:
  1. cache vs no-cache at each prompt length (batch 1): ms per new token and tokens/s;
  2. cached decode tokens/s and ms/step for each batch size;
  3. the same cached runs with Hugging Face transformers (PyTorch) `generate` on the
     same model shape (random weights), with the kvjax/transformers ratio, when installed.
Every figure uses kvjax.timing's method: warm (compile excluded and reported apart),
calibrated so one measurement lasts >= --min-seconds, --repeats measurements, median.
The cached ms/step is generate's decode loop (a lax.scan of --new-tokens steps on a
donated cache) timed on a cache prefilled outside the timed region; the no-cache figure is
a whole generate(use_cache=False) per new token; transformers is timed the same way on its
own decode loop (kvjax.baselines.hf_step_timing). A figure whose spread is wider than its
median prints as INVALID and no ratio is formed from it. The bandwidth column is
gpt-fast's figure: (parameter bytes + live KV bytes) read per step / step time.
"""
from __future__ import annotations

import argparse
import platform

import jax
import numpy as np

import kvjax
from kvjax.baselines import hf_model_like, hf_step_timing
from kvjax.bench import time_decode, time_prefill
from kvjax.timing import Timing, measure


def _ms(t: Timing) -> str:
    return f"{1e3 * t.median_s:.3f}" if t.valid else "INVALID"


def kvjax_cached(cfg, params, batch, prompt_len, new, kw):
    """(decode Timing per step, prefill Timing) with the cache."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    lens = np.full((batch,), prompt_len, np.int32)
    _, step = time_decode(cfg, params, prompts, lens, kvjax.init_cache(cfg, batch, prompt_len + new), new, **kw)
    _, pre = time_prefill(cfg, params, prompts, lens, kvjax.init_cache(cfg, batch, prompt_len + new), **kw)
    return step, pre


def kvjax_nocache(cfg, params, batch, prompt_len, new, kw):
    """Timing per new token when every token re-runs the model over its whole prefix."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    _, t = measure(lambda _: kvjax.generate(cfg, params, prompts, max_new_tokens=new, use_cache=False).tokens,
                   units=new, **kw)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small", help="model shape (kvjax.ModelConfig.presets())")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 1024],
                    help="prompt lengths for the cache vs no-cache table")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    ap.add_argument("--batch-prompt-len", type=int, default=128, help="prompt length for the batch table")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=5, help="timed measurements (median reported)")
    ap.add_argument("--min-seconds", type=float, default=0.2, help="calibrated length of one measurement")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args(argv)

    cfg = kvjax.ModelConfig.preset(args.preset, dtype=args.dtype)
    params = kvjax.init_params(cfg, jax.random.key(0))
    pbytes = kvjax.param_bytes(params)
    dev = jax.devices()[0]
    print(f"kvjax decode bench | {args.preset} {args.dtype} | {kvjax.param_count(params)/1e6:.1f}M params "
          f"({pbytes/1e6:.0f} MB) | jax {jax.__version__} on {dev.platform}:{dev.device_kind} "
          f"x{jax.device_count()} | {platform.processor() or platform.machine()} | new tokens {args.new_tokens}")

    kw = dict(repeats=args.repeats, min_seconds=args.min_seconds)
    hf = None if args.no_hf else hf_model_like(cfg)

    def ratio(a: Timing, b: Timing) -> str:
        return f"{a.median_s / b.median_s:.2f}x" if a.valid and b.valid else "-"

    print("\n1. cache vs no-cache, batch 1 (ms per new token; speedup = no-cache / cache)")
    head = f"{'prompt':>7} {'cache ms':>9} {'no-cache ms':>12} {'speedup':>8} {'prefill ms':>11}"
    print(head + ("" if hf is None else f" {'hf ms/step':>11} {'hf/kvjax':>9}"))
    for n in args.prompt_lens:
        step, pre = kvjax_cached(cfg, params, 1, n, args.new_tokens, kw)
        nocache = kvjax_nocache(cfg, params, 1, n, args.new_tokens, kw)
        line = f"{n:>7} {_ms(step):>9} {_ms(nocache):>12} {ratio(nocache, step):>8} {_ms(pre):>11}"
        if hf is not None:
            h = hf_step_timing(hf, cfg.vocab_size, 1, n, args.new_tokens, **kw)
            line += f" {_ms(h):>11} {ratio(h, step):>9}"
        print(line)

    print(f"\n2. cached decode by batch (prompt {args.batch_prompt_len})"
          + ("" if hf is None else "; transformers' decode loop on the same shape, default cache"))
    head = f"{'batch':>6} {'ms/step':>8} {'tok/s':>9} {'GB/s':>7}"
    print(head + ("" if hf is None else f" {'hf ms/step':>11} {'hf/kvjax':>9}"))
    for b in args.batches:
        step, _ = kvjax_cached(cfg, params, b, args.batch_prompt_len, args.new_tokens, kw)
        live_kv = kvjax.cache_bytes(cfg, b, args.batch_prompt_len + (args.new_tokens + 1) // 2) - 4 * b
        if step.valid:
            line = (f"{b:>6} {_ms(step):>8} {b / step.median_s:>9.1f} "
                    f"{(pbytes + live_kv) / step.median_s / 1e9:>7.1f}")
        else:
            line = f"{b:>6} {'INVALID':>8} {'-':>9} {'-':>7}"
        if hf is not None:
            h = hf_step_timing(hf, cfg.vocab_size, b, args.batch_prompt_len, args.new_tokens, **kw)
            line += f" {_ms(h):>11} {ratio(h, step):>9}"
        print(line)
    if hf is None and not args.no_hf:
        print("(transformers/torch not installed: comparison skipped)")


if __name__ == "__main__":
    main()
