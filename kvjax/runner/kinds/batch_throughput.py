"""batch_throughput: decode tokens/s and per-step latency against batch size.

For each batch size B, on a preset shape with random weights:

  * per-step latency: `kvjax.decode_step` (check=False) on a cache prefilled with
    `prompt_len` tokens per row; median of `step_repeats` steps after a compile step.
    Step tokens/s = B / step time. The step reads every weight and the whole cache
    buffer once, so (param bytes + cache bytes) / step time is the memory bandwidth the
    step achieves (the gpt-fast figure: how close decoding is to the hardware).
  * end to end: `kvjax.generate` of `new_tokens` per row after the prompt (prefill and
    the whole decode loop in one jit), median of `gen_repeats` calls after a warm-up
    call; tokens/s = B x new_tokens / time.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

import kvjax

from .. import plots
from ..models import ShapeConfig, model_config, random_params, random_tokens
from ..schema import ConfigError, option
from ..timing import Timing, measure, timed


@dataclass(frozen=True)
class Config(ShapeConfig):
    batch_sizes: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), min=1, min_items=1,
                                          help="batch sizes to measure")
    prompt_len: int = option(32, min=1, help="prompt tokens per row (cache length before decoding)")
    new_tokens: int = option(128, min=1, help="tokens generated per row in the end-to-end measurement")
    step_repeats: int = option(20, min=1, help="timed decode steps per batch size (median)")
    gen_repeats: int = option(3, min=1, help="timed generate calls per batch size (median)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("batch_throughput", c, run_cfg.dtype)
    longest = c.prompt_len + max(c.new_tokens, c.step_repeats + 1)
    if cfg.positions == "learned" and longest > cfg.max_position:
        raise ConfigError(f"batch_throughput.new_tokens: prompt_len + new_tokens = {longest} exceeds "
                          f"the learned position table (max_position={cfg.max_position})")


def _time_steps(cfg, params, B, P, repeats, seed):
    cache = kvjax.init_cache(cfg, B, P + 1 + repeats)
    _, cache = kvjax.prefill(cfg, params, random_tokens(cfg, seed, (B, P)),
                             np.full((B,), P, np.int32), cache)
    tok = jnp.asarray(random_tokens(cfg, seed + 1, (B,)))
    (_, cache), first = timed(kvjax.decode_step, cfg, params, tok, cache, check=False)
    t = Timing(first)
    for _ in range(repeats):
        (_, cache), s = timed(kvjax.decode_step, cfg, params, tok, cache, check=False)
        t.times.append(s)
    return t, cache.nbytes


def run(ctx, c: Config) -> dict:
    cfg = model_config("batch_throughput", c, ctx.dtype)
    params = random_params(cfg, ctx.seed)
    pbytes = kvjax.param_bytes(params)
    ctx.note(f"Model: {cfg.name} shape ({kvjax.param_count(params):,} parameters, "
             f"{pbytes / 2**20:.2f} MiB, {cfg.dtype}), random weights; prompt {c.prompt_len} "
             f"tokens per row, {c.new_tokens} new tokens per row end to end. Medians after a "
             f"compile call.")
    rows = []
    for B in ctx.track(c.batch_sizes, "batch size"):
        step, cache_nbytes = _time_steps(cfg, params, B, c.prompt_len, c.step_repeats, ctx.seed + B)
        prompt = random_tokens(cfg, ctx.seed + B, (B, c.prompt_len))
        _, gen = measure(lambda: kvjax.generate(cfg, params, prompt, max_new_tokens=c.new_tokens).tokens,
                         c.gen_repeats)
        row = {"batch_size": B, "step_ms": 1e3 * step.median_s, "step_tok_s": B / step.median_s,
               "step_compile_s": step.compile_s, "generate_s": gen.median_s,
               "generate_tok_s": B * c.new_tokens / gen.median_s, "generate_first_s": gen.first_s,
               "param_bytes": pbytes, "cache_bytes": cache_nbytes,
               "bandwidth_gb_s": (pbytes + cache_nbytes) / step.median_s / 1e9}
        ctx.log(row)
        rows.append(row)
    ctx.table("Decode throughput vs batch size",
              ["batch", "step ms", "step tok/s", "generate s", "generate tok/s", "step GB/s"],
              [[r["batch_size"], r["step_ms"], r["step_tok_s"], r["generate_s"], r["generate_tok_s"],
                r["bandwidth_gb_s"]] for r in rows])
    best = max(rows, key=lambda r: r["step_tok_s"])
    ctx.note(f"Batch {rows[0]['batch_size']} -> {rows[-1]['batch_size']}: step latency "
             f"{rows[0]['step_ms']:.3g} -> {rows[-1]['step_ms']:.3g} ms, step throughput "
             f"{rows[0]['step_tok_s']:,.0f} -> {rows[-1]['step_tok_s']:,.0f} tok/s "
             f"(best {best['step_tok_s']:,.0f} tok/s at batch {best['batch_size']}). A timed step is "
             f"one jitted call from Python (its dispatch included); generate runs the whole decode "
             f"loop in one call, so on small shapes its tokens/s can exceed the step figure.")

    fig, axes = plots.figure(ncols=2)
    bs = [r["batch_size"] for r in rows]
    plots.lines(axes[0], bs, {"decode step": [r["step_tok_s"] for r in rows],
                              "generate (end to end)": [r["generate_tok_s"] for r in rows]},
                xlabel="batch size", ylabel="tokens/s", title=f"Throughput, {cfg.name} shape",
                logx=True, logy=True)
    plots.lines(axes[1], bs, {"decode step": [r["step_ms"] for r in rows]},
                xlabel="batch size", ylabel="ms per step (median)", title="Per-step latency",
                logx=True, logy=True)
    ctx.save_figure(fig, "batch_throughput.png")
    return {"model": cfg.name, "batch_sizes": bs, "step_ms": [r["step_ms"] for r in rows],
            "step_tok_s": [r["step_tok_s"] for r in rows],
            "generate_tok_s": [r["generate_tok_s"] for r in rows],
            "best_step_tok_s": best["step_tok_s"], "best_batch_size": best["batch_size"]}
