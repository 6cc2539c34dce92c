"""Decode benchmark: cached vs no-cache generation, batch scaling, and transformers on the same shape.

    python benchmarks/decode_bench.py                       # CPU-sized defaults
    python benchmarks/decode_bench.py --preset llama-1b --dtype bfloat16 --new-tokens 128 \
        --prompt-lens 128 512 1024 --batches 1 8 32           # an accelerator

Prints three tables on whatever backend JAX runs:
  1. cache vs no-cache at each prompt length (batch 1): ms per new token and tokens/s;
  2. cached decode tokens/s and ms/step for each batch size;
  3. the same cached runs with Hugging Face transformers (PyTorch) `generate` on the
     same model shape (random weights), with the kvjax/transformers ratio, when installed.
Times are medians over --repeats runs after a warm-up (compile) run, each ended with
`jax.block_until_ready`. ms/step of the cached decode excludes prefill: it is
(time to generate 2N tokens - time to generate N) / N, on the same cache shape. The bandwidth column is gpt-fast's figure:
(parameter bytes + live KV bytes) read per step / step time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

import kvjax
from kvjax.baselines import hf_model_like, hf_step_ms


def median_time(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kvjax_cached(cfg, params, batch, prompt_len, new, repeats):
    """(ms per decode step, ms prefill) for generate with the cache.

    A step's cost is the difference between generating 2*new and new tokens into the same
    max_len (same prefill, same cache shape), divided by new.
    """
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    max_len = prompt_len + 2 * new
    lens = np.full((batch,), prompt_len, np.int32)
    gen = lambda n: lambda: kvjax.generate(cfg, params, prompts, max_new_tokens=n, max_len=max_len).tokens  # noqa: E731
    pre = lambda: kvjax.prefill(cfg, params, prompts, lens, kvjax.init_cache(cfg, batch, max_len))[0]  # noqa: E731
    t_step = (median_time(gen(2 * new), repeats) - median_time(gen(new), repeats)) / new
    return 1e3 * max(t_step, 0.0), 1e3 * median_time(pre, repeats)


def kvjax_nocache(cfg, params, batch, prompt_len, new, repeats):
    """ms per new token when every token re-runs the model over its whole prefix."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    gen = lambda: kvjax.generate(cfg, params, prompts, max_new_tokens=new, use_cache=False).tokens  # noqa: E731
    return 1e3 * median_time(gen, repeats) / new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small", help="model shape (kvjax.ModelConfig.presets())")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 1024],
                    help="prompt lengths for the cache vs no-cache table")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    ap.add_argument("--batch-prompt-len", type=int, default=128, help="prompt length for the batch table")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args(argv)

    cfg = kvjax.ModelConfig.preset(args.preset, dtype=args.dtype)
    params = kvjax.init_params(cfg, jax.random.key(0))
    pbytes = kvjax.param_bytes(params)
    dev = jax.devices()[0]
    print(f"kvjax decode bench | {args.preset} {args.dtype} | {kvjax.param_count(params)/1e6:.1f}M params "
          f"({pbytes/1e6:.0f} MB) | jax {jax.__version__} on {dev.platform}:{dev.device_kind} "
          f"x{jax.device_count()} | {platform.processor() or platform.machine()} | new tokens {args.new_tokens}")

    print("\n1. cache vs no-cache, batch 1 (ms per new token; speedup = no-cache / cache)")
    hf = None if args.no_hf else hf_model_like(cfg)
    head = f"{'prompt':>7} {'cache ms':>9} {'tok/s':>8} {'no-cache ms':>12} {'tok/s':>8} {'speedup':>8} {'prefill ms':>11}"
    print(head + ("" if hf is None else f" {'hf ms/step':>11} {'kvjax/hf':>9}"))
    for n in args.prompt_lens:
        c_ms, pre_ms = kvjax_cached(cfg, params, 1, n, args.new_tokens, args.repeats)
        nc_ms = kvjax_nocache(cfg, params, 1, n, args.new_tokens, args.repeats)
        line = f"{n:>7} {c_ms:>9.2f} {1e3/c_ms:>8.1f} {nc_ms:>12.2f} {1e3/nc_ms:>8.1f} {nc_ms/c_ms:>7.1f}x {pre_ms:>11.1f}"
        if hf is not None:
            hms = hf_step_ms(hf, cfg.vocab_size, 1, n, args.new_tokens, args.repeats)
            line += f" {hms:>11.2f} {hms/c_ms:>8.2f}x"
        print(line)

    print(f"\n2. cached decode by batch (prompt {args.batch_prompt_len})"
          + ("" if hf is None else "; transformers generate on the same shape, default cache"))
    head = f"{'batch':>6} {'ms/step':>8} {'tok/s':>9} {'GB/s':>7}"
    print(head + ("" if hf is None else f" {'hf ms/step':>11} {'hf tok/s':>9} {'kvjax/hf':>9}"))
    for b in args.batches:
        ms, _ = kvjax_cached(cfg, params, b, args.batch_prompt_len, args.new_tokens, args.repeats)
        live_kv = kvjax.cache_bytes(cfg, b, args.batch_prompt_len + args.new_tokens // 2) - 4 * b
        line = f"{b:>6} {ms:>8.2f} {b*1e3/ms:>9.1f} {(pbytes + live_kv)/ms/1e6:>7.1f}"
        if hf is not None:
            hms = hf_step_ms(hf, cfg.vocab_size, b, args.batch_prompt_len, args.new_tokens, args.repeats)
            line += f" {hms:>11.2f} {b*1e3/hms:>9.1f} {hms/ms:>8.2f}x"
        print(line)
    if hf is None and not args.no_hf:
        print("(transformers/torch not installed: comparison skipped)")


if __name__ == "__main__":
    main()
