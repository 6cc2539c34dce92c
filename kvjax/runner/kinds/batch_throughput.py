"""batch_throughput: decode tokens/s and per-step latency against batch size.

For each batch size B, on a preset shape with random weights:

  * per-step latency: generate's decode loop (`new_tokens` greedy steps in one
    `lax.scan`) on a cache prefilled with `prompt_len` tokens per row outside the timed
    region (`kvjax.bench.time_decode`); median of `step_repeats` calibrated measurements.
    Step tokens/s = B / step time. A step reads every weight and the live cache once, so
    (param bytes + live cache bytes) / step time is the bandwidth the step achieves (the
    gpt-fast figure; on a CPU these small shapes sit in the CPU caches, so it is no DRAM
    figure).
  * end to end: `kvjax.generate` of `new_tokens` per row after the prompt (prefill and
    the whole decode loop in one jit, host checks included), median of `gen_repeats`
    calibrated measurements; tokens/s = B x new_tokens / time.

Every timing is warm, calibrated to last `min_seconds` per measurement and synchronised
(`kvjax.timing`); a row whose timing is invalid (spread wider than the median) says so,
and the summary counts such rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kvjax
from kvjax.bench import time_decode
from kvjax.timing import measure

from .. import plots
from ..models import ShapeConfig, model_config, random_params, random_tokens
from ..schema import ConfigError, option


@dataclass(frozen=True)
class Config(ShapeConfig):
    batch_sizes: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), min=1, min_items=1,
                                          help="batch sizes to measure")
    prompt_len: int = option(32, min=1, help="prompt tokens per row (cache length before decoding)")
    new_tokens: int = option(128, min=1, help="tokens generated per row in the end-to-end measurement")
    step_repeats: int = option(5, min=1, help="timed measurements of the decode loop per batch size (median)")
    gen_repeats: int = option(3, min=1, help="timed measurements of generate per batch size (median)")
    min_seconds: float = option(0.2, min=0.0, help="calibrated length of one measurement (s)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("batch_throughput", c, run_cfg.dtype)
    longest = c.prompt_len + c.new_tokens
    if cfg.positions == "learned" and longest > cfg.max_position:
        raise ConfigError(f"batch_throughput.new_tokens: prompt_len + new_tokens = {longest} exceeds "
                          f"the learned position table (max_position={cfg.max_position})")


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
        prompt = random_tokens(cfg, ctx.seed + B, (B, c.prompt_len))
        lens = np.full((B,), c.prompt_len, np.int32)
        kw = dict(min_seconds=c.min_seconds)
        cache = kvjax.init_cache(cfg, B, c.prompt_len + c.new_tokens)
        _, step = time_decode(cfg, params, prompt, lens, cache, c.new_tokens, repeats=c.step_repeats, **kw)
        _, gen = measure(lambda _: kvjax.generate(cfg, params, prompt, max_new_tokens=c.new_tokens).tokens,
                         repeats=c.gen_repeats, **kw)
        live = kvjax.cache_bytes(cfg, B, c.prompt_len + (c.new_tokens + 1) // 2) - 4 * B
        row = {"batch_size": B, **step.fields("step"), "step_tok_s": B / step.median_s,
               **gen.fields("generate", scale=1.0, unit="s"),
               "generate_tok_s": B * c.new_tokens / gen.median_s, "generate_first_s": gen.first_s,
               "param_bytes": pbytes, "live_cache_bytes": live,
               "bandwidth_gb_s": (pbytes + live) / step.median_s / 1e9,
               "valid": step.valid and gen.valid,
               "invalid_reason": "; ".join(r for r in (step.reason, gen.reason) if r) or None}
        ctx.log(row)
        rows.append(row)
    ctx.table("Decode throughput vs batch size",
              ["batch", "step ms", "spread ms", "step tok/s", "generate s", "generate tok/s", "step GB/s",
               "valid"],
              [[r["batch_size"], r["step_ms"], r["step_spread_ms"], r["step_tok_s"], r["generate_s"],
                r["generate_tok_s"], r["bandwidth_gb_s"],
                "yes" if r["valid"] else f"NO: {r['invalid_reason']}"] for r in rows])
    best = max(rows, key=lambda r: r["step_tok_s"])
    ctx.note(f"Batch {rows[0]['batch_size']} -> {rows[-1]['batch_size']}: step latency "
             f"{rows[0]['step_ms']:.3g} -> {rows[-1]['step_ms']:.3g} ms, step throughput "
             f"{rows[0]['step_tok_s']:,.0f} -> {rows[-1]['step_tok_s']:,.0f} tok/s "
             f"(best {best['step_tok_s']:,.0f} tok/s at batch {best['batch_size']}). Steps are timed "
             f"inside generate's decode loop (prefill excluded); generate's tokens/s includes its "
             f"prefill and host checks.")
    invalid = [r for r in rows if not r["valid"]]
    if invalid:
        ctx.note(f"{len(invalid)} row(s) INVALID: " + "; ".join(
            f"batch {r['batch_size']}: {r['invalid_reason']}" for r in invalid))

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
            "best_step_tok_s": best["step_tok_s"], "best_batch_size": best["batch_size"],
            "invalid_rows": len(invalid)}
