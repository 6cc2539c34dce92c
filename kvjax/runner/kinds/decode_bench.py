"""decode_bench: decode latency against live context and batch, with model bandwidth utilisation.

For each preset shape (random weights), batch size B and live context C:

  * per-step latency: (time to generate 2N tokens - time to generate N) / N after a
    prompt of C tokens, medians of `repeats` calls after a warm-up (compile) call, each
    ended with `jax.block_until_ready`; prefill and the compile time reported beside it;
  * MBU = (parameter bytes + live KV bytes) / step time / bandwidth, where the live KV
    bytes are those of the mean live context (C + 1.5 N tokens over the timed steps) and
    the bandwidth is measured by this run on this device: a jitted elementwise copy of
    `copy_mib` MiB, counting bytes read plus written (the spec-sheet figure is printed
    beside it where the device is known);
  * length awareness: one step at `long_max_len` slots with `short_live` live tokens
    against the same step at `short_max_len` slots (the step should follow the live
    context, not the allocation);
  * transformers (when installed and `hf: true`): `generate` on the same shape and dtype
    with its default dynamic cache and with `cache_implementation="static"`, and the
    kvjax / transformers speed ratios.

Combinations whose weights and cache do not fit the device (memory_stats limit) are
skipped with a note, never silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.baselines import hf_model_like, hf_step_ms

from .. import plots
from ..env import memory_stats
from ..schema import ConfigError, option
from ..timing import measure

# Spec-sheet HBM bandwidth (GB/s) by device_kind substring, for reference only.
SPEC_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "TPU v5 lite": 819.0,
            "TPU v4": 1200.0}


@dataclass(frozen=True)
class Config:
    presets: tuple[str, ...] = option(("llama-1b", "llama-7b"), min_items=1,
                                      help="model shapes (kvjax.ModelConfig presets), random weights")
    model: dict = option({}, help="ModelConfig overrides applied to every preset (e.g. a smaller vocab)")
    batch_sizes: tuple[int, ...] = option((1, 16, 64), min=1, min_items=1, help="batch sizes")
    contexts: tuple[int, ...] = option((128, 512, 1024, 2048, 4096), min=1, min_items=1,
                                       help="live context (prompt tokens) before the timed steps")
    new_tokens: int = option(32, min=2, help="N: steps are timed as generate(2N) - generate(N)")
    repeats: int = option(3, min=1, help="timed calls per measurement (median)")
    copy_mib: int = option(1024, min=1, help="size of the bandwidth-measuring copy (MiB)")
    short_max_len: int = option(512, min=2, help="length check: cache slots of the short cache")
    long_max_len: int = option(8192, min=2, help="length check: cache slots of the long cache")
    short_live: int = option(256, min=1, help="length check: live tokens in both caches")
    hf: bool = option(True, help="also time transformers generate (default and static cache)")
    hf_max_batch: int = option(64, min=1, help="largest batch given to transformers")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    for p in c.presets:
        try:
            kvjax.ModelConfig.preset(p).replace(**c.model)
        except ValueError as e:
            raise ConfigError(f"decode_bench.presets: {e}") from None
    if c.short_live + 2 * c.new_tokens > c.short_max_len:
        raise ConfigError(f"decode_bench.short_live: short_live + 2 * new_tokens = "
                          f"{c.short_live + 2 * c.new_tokens} exceeds short_max_len={c.short_max_len}")


def measure_bandwidth(mib: int, repeats: int) -> float:
    """GB/s of a jitted elementwise copy (bytes read + bytes written)."""
    n = mib * 2**20 // 4
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    _, t = measure(lambda: copy(x), max(repeats, 5))
    return 2 * n * 4 / t.median_s / 1e9


def _kvjax_step(cfg, params, B, C, N, repeats, seed, max_len=None):
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, C), dtype=np.int32)
    max_len = max_len or C + 2 * N
    gen = lambda n: (lambda: kvjax.generate(cfg, params, prompts, max_new_tokens=n, max_len=max_len).tokens)  # noqa: E731
    _, t2 = measure(gen(2 * N), repeats)
    _, t1 = measure(gen(N), repeats)
    lens = np.full((B,), C, np.int32)
    _, tp = measure(lambda: kvjax.prefill(cfg, params, prompts, lens, kvjax.init_cache(cfg, B, max_len))[0],
                    repeats)
    step = max(t2.median_s - t1.median_s, 1e-9) / N
    return step, tp.median_s, t2.compile_s


def _fits(cfg, B, max_len, pbytes, device) -> bool:
    stats = memory_stats(device)
    limit = (stats or {}).get("bytes_limit")
    need = pbytes + 2 * kvjax.cache_bytes(cfg, B, max_len)   # cache + the donated copy in flight
    return limit is None or need < 0.9 * limit


def run(ctx, c: Config) -> dict:
    bw = measure_bandwidth(c.copy_mib, c.repeats)
    spec = next((v for k, v in SPEC_GBS.items() if k in ctx.device.device_kind), None)
    ctx.note(f"Measured copy bandwidth {bw:,.0f} GB/s (read + write, {c.copy_mib} MiB) on "
             f"{ctx.device.device_kind}" + (f"; spec sheet {spec:,.0f} GB/s" if spec else "")
             + f". dtype {ctx.dtype}, {c.new_tokens} timed steps per measurement.")
    rows, headline = [], {"bandwidth_gb_s": bw, "spec_gb_s": spec}
    for preset in c.presets:
        cfg = kvjax.ModelConfig.preset(preset).replace(dtype=ctx.dtype, **c.model)
        params = kvjax.init_params(cfg, jax.random.key(ctx.seed))
        pbytes = kvjax.param_bytes(params)
        hf = hf_model_like(cfg) if c.hf else None
        combos = [(B, C) for B in c.batch_sizes for C in c.contexts]
        with ctx.progress(len(combos), preset) as advance:
            for B, C in combos:
                advance(note=f"B={B} C={C}")
                max_len = C + 2 * c.new_tokens
                if C + 2 * c.new_tokens > cfg.max_position and cfg.positions == "learned":
                    continue
                if not _fits(cfg, B, max_len, pbytes, ctx.device):
                    ctx.note(f"skipped {preset} B={B} C={C}: weights + cache exceed device memory")
                    continue
                step, prefill_s, compile_s = _kvjax_step(cfg, params, B, C, c.new_tokens, c.repeats,
                                                         ctx.seed + B + C)
                live_kv = kvjax.cache_bytes(cfg, B, C + (3 * c.new_tokens) // 2) - 4 * B
                row = {"preset": preset, "batch": B, "context": C, "step_ms": 1e3 * step,
                       "tok_s": B / step, "prefill_ms": 1e3 * prefill_s, "compile_s": compile_s,
                       "param_bytes": pbytes, "live_kv_bytes": live_kv,
                       "mbu": (pbytes + live_kv) / step / 1e9 / bw}
                if hf is not None and B <= c.hf_max_batch:
                    for name, impl in (("hf_default", None), ("hf_static", "static")):
                        ms = hf_step_ms(hf, cfg.vocab_size, B, C, c.new_tokens, c.repeats, impl)
                        row[f"{name}_step_ms"] = ms
                        row[f"speedup_vs_{name}"] = ms / row["step_ms"]
                ctx.log(row)
                rows.append(row)

        # Length awareness: same live tokens, short vs long allocation.
        short, _, _ = _kvjax_step(cfg, params, 1, c.short_live, c.new_tokens, c.repeats, ctx.seed,
                                  c.short_max_len)
        long_ok = _fits(cfg, 1, c.long_max_len, pbytes, ctx.device)
        long = _kvjax_step(cfg, params, 1, c.short_live, c.new_tokens, c.repeats, ctx.seed,
                           c.long_max_len)[0] if long_ok else None
        if long is not None:
            ctx.log({"preset": preset, "length_check": True, "short_max_len": c.short_max_len,
                     "long_max_len": c.long_max_len, "live": c.short_live,
                     "short_step_ms": 1e3 * short, "long_step_ms": 1e3 * long})
            ctx.note(f"{preset}: {c.short_live} live tokens, step {1e3 * short:.3f} ms at max_len "
                     f"{c.short_max_len} vs {1e3 * long:.3f} ms at max_len {c.long_max_len} "
                     f"({100 * (long / short - 1):+.1f}%)")
            headline[f"{preset}_long_vs_short"] = long / short

    if not rows:
        raise RuntimeError("decode_bench measured nothing: every combination was skipped")
    cols = ["preset", "batch", "context", "step ms", "tok/s", "MBU", "prefill ms", "compile s"]
    has_hf = any("hf_static_step_ms" in r for r in rows)
    if has_hf:
        cols += ["hf default ms", "hf static ms", "x default", "x static"]
    table = []
    for r in rows:
        line = [r["preset"], r["batch"], r["context"], r["step_ms"], r["tok_s"], r["mbu"],
                r["prefill_ms"], r["compile_s"]]
        if has_hf:
            line += [r.get("hf_default_step_ms"), r.get("hf_static_step_ms"),
                     r.get("speedup_vs_hf_default"), r.get("speedup_vs_hf_static")]
        table.append(line)
    ctx.table("Decode step vs live context", cols, table)

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plots.figure(ncols=len(presets))
    for ax, preset in zip(axes, presets):
        series = {}
        for B in c.batch_sizes:
            pts = {r["context"]: r["step_ms"] for r in rows if r["preset"] == preset and r["batch"] == B}
            if pts:
                series[f"batch {B}"] = [pts.get(C) for C in c.contexts]
        plots.lines(ax, list(c.contexts), series, xlabel="live context (tokens)", ylabel="ms per step",
                    title=f"{preset} decode, {ctx.dtype}", logx=True)
    ctx.save_figure(fig, "decode_bench.png")
    for r in rows:
        key = f"{r['preset']}_b{r['batch']}_c{r['context']}"
        headline[f"{key}_mbu"] = r["mbu"]
        headline[f"{key}_tok_s"] = r["tok_s"]
    return headline
