"""memory_scaling: KV cache bytes against context length, batch size and kv heads.

For each attention layout in `kv_heads` (MHA when it equals the preset's query heads,
MQA at 1, GQA between) the run computes:

  * predicted bytes: `kvjax.cache_bytes(cfg, batch, context)` (no allocation);
  * allocated bytes: `KVCache.nbytes` of a real `kvjax.init_cache(...)` on the run's
    device, for caches up to `alloc_limit_mib` (bigger ones are predicted only);
  * device memory growth: `bytes_in_use` from `device.memory_stats()` before and after
    the allocation, where the backend reports it (GPU/TPU); on CPU it reports nothing
    and the run records "unavailable" rather than inventing a number;
  * the longest context that fits a memory budget (`budget_gib`, minus the weights when
    `budget_includes_params`; weight bytes come from `jax.eval_shape`, so nothing is
    allocated), and the same for the device's own `bytes_limit` where it reports one.

Sweeps: context lengths at `base_batch`, batch sizes at `base_context`, each for every
kv-head layout. Hybrid caches: for each preset in `hybrid_presets` (models with windowed
layers, e.g. Gemma 3), the bytes of the default hybrid cache (a ring of `window` slots on
each windowed layer) against a full cache (`hybrid=False`) at `hybrid_contexts`. No model runs, so a full-size shape (the default, llama-1b) costs
seconds.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import jax
import numpy as np

import kvjax

from .. import plots
from ..env import memory_stats
from ..models import ShapeConfig, model_config
from ..schema import ConfigError, option

MIB = 2 ** 20
GIB = 2 ** 30


@dataclass(frozen=True)
class Config(ShapeConfig):
    preset: str = option("llama-1b", help="model shape: a kvjax.ModelConfig preset name")
    kv_heads: tuple[int, ...] = option((32, 8, 4, 1), min=1, min_items=1,
                                       help="kv-head counts to compare (each divides the query heads)")
    context_lens: tuple[int, ...] = option((512, 1024, 2048, 4096, 8192), min=1, min_items=1,
                                           help="cache lengths (tokens) for the context sweep")
    batch_sizes: tuple[int, ...] = option((1, 2, 4, 8, 16), min=1, min_items=1,
                                          help="batch sizes for the batch sweep and the budget table")
    base_context: int = option(2048, min=1, help="context length held fixed in the batch sweep")
    base_batch: int = option(1, min=1, help="batch size held fixed in the context sweep")
    cache_dtype: str | None = option(None, choices=(None, "float32", "bfloat16", "float16"),
                                     help="cache dtype; null = the model dtype (int8 ignores it)")
    cache_kind: str = option("dense", choices=("dense", "int8"),
                             help="cache layout: dense buffers, or int8 values with float32 scales")
    allocate: bool = option(True, help="allocate caches to compare real bytes with the prediction")
    alloc_limit_mib: float = option(256.0, min=0.0, help="largest cache (MiB) to actually allocate")
    budget_gib: float = option(16.0, min=0.0, help="memory budget (GiB) for the longest-context table")
    budget_includes_params: bool = option(True, help="subtract the model weights from the budget")
    hybrid_presets: tuple[str, ...] = option((), help="presets with windowed layers whose hybrid "
                                             "cache (rings on windowed layers) is compared with a full one")
    hybrid_contexts: tuple[int, ...] = option((4096, 8192, 32768), min=1, min_items=1,
                                              help="cache lengths (tokens) for the hybrid comparison")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("memory_scaling", c, run_cfg.dtype)
    for i, name in enumerate(c.hybrid_presets):
        try:
            hcfg = kvjax.ModelConfig.preset(name)
        except ValueError as e:
            raise ConfigError(f"memory_scaling.hybrid_presets[{i}]: {e}") from None
        if not hcfg.sliding_layers:
            raise ConfigError(f"memory_scaling.hybrid_presets[{i}]: {name!r} has no windowed layers, "
                              f"so its cache cannot be hybrid")
    for i, k in enumerate(c.kv_heads):
        if cfg.num_heads % k:
            raise ConfigError(f"memory_scaling.kv_heads[{i}]: {k} does not divide num_heads="
                              f"{cfg.num_heads}; allowed: divisors of {cfg.num_heads}")


def layout(num_heads: int, kv: int) -> str:
    return "MHA" if kv == num_heads else "MQA" if kv == 1 else f"GQA-{num_heads // kv}"


def param_bytes_abstract(cfg) -> int:
    """Bytes of init_params(cfg), from shapes alone (jax.eval_shape allocates nothing)."""
    shapes = jax.eval_shape(lambda k: kvjax.init_params(cfg, k), jax.random.key(0))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def max_context(cfg, batch: int, budget: int, dtype, kind: str = "dense") -> int:
    """Longest max_len with cache_bytes(cfg, batch, max_len) <= budget (0 if none fits)."""
    size = lambda n: kvjax.cache_bytes(cfg, batch, n, dtype, kind=kind)  # noqa: E731 (linear in n)
    per_token, fixed = size(2) - size(1), 2 * size(1) - size(2)
    n = (budget - fixed) // per_token
    if n < 1:
        return 0
    assert size(n) <= budget < size(n + 1)
    return int(n)


def _per_token(cfg, c: Config) -> int:
    """Bytes one more cached token adds to one row."""
    return (kvjax.cache_bytes(cfg, 1, 2, c.cache_dtype, kind=c.cache_kind)
            - kvjax.cache_bytes(cfg, 1, 1, c.cache_dtype, kind=c.cache_kind))


def _measure(ctx, cfg, c: Config, batch: int, context: int, sweep: str) -> dict:
    dtype = c.cache_dtype
    predicted = kvjax.cache_bytes(cfg, batch, context, dtype, kind=c.cache_kind)
    row = {"sweep": sweep, "layout": layout(cfg.num_heads, cfg.num_kv_heads),
           "kv_heads": cfg.num_kv_heads, "cache_kind": c.cache_kind, "batch_size": batch,
           "context_len": context,
           "predicted_bytes": predicted, "allocated_bytes": None, "match": None,
           "device_delta_bytes": None, "device_stats": "unavailable"}
    if c.allocate and predicted <= c.alloc_limit_mib * MIB:
        before = memory_stats(ctx.device)
        cache = jax.block_until_ready(kvjax.init_cache(cfg, batch, context, dtype, kind=c.cache_kind))
        after = memory_stats(ctx.device)
        row["allocated_bytes"] = cache.nbytes
        row["match"] = cache.nbytes == predicted
        if before and after and "bytes_in_use" in before:
            row["device_delta_bytes"] = after["bytes_in_use"] - before["bytes_in_use"]
            row["device_stats"] = "bytes_in_use"
        del cache
        gc.collect()
    else:
        row["allocated_bytes"] = None
    ctx.log(row)
    return row


def run(ctx, c: Config) -> dict:
    base = model_config("memory_scaling", c, ctx.dtype)
    cfgs = {k: base.replace(num_kv_heads=k) for k in c.kv_heads}
    per_token = {k: _per_token(cfgs[k], c) for k in c.kv_heads}
    storage = "int8 + float32 scales" if c.cache_kind == "int8" else (c.cache_dtype or base.dtype)
    ctx.note(f"Shape: {base.name} (layers={base.num_layers}, query heads={base.num_heads}, "
             f"head_dim={base.head_dim}), {c.cache_kind} cache, {storage}. Bytes per cached token "
             f"per row: " + ", ".join(f"{layout(base.num_heads, k)} {per_token[k]:,}" for k in c.kv_heads)
             + f". Caches up to {c.alloc_limit_mib:g} MiB are allocated on {ctx.device.platform} "
               f"and compared with kvjax.cache_bytes.")
    rows = _sweeps(ctx, c, base, cfgs)
    stats_seen = any(r["device_stats"] != "unavailable" for r in rows)
    budgets, fit = _budget_tables(ctx, c, base, cfgs)
    _plot(ctx, base, c, rows, fit, budgets[0][0])
    hybrid = _hybrid(ctx, c)
    rows += hybrid
    allocated = [r for r in rows if r["match"] is not None]
    return {"hybrid_vs_full": {f"{r['preset']} S={r['context_len']}": r["full_over_hybrid"] for r in hybrid},
            "shape": base.name, "allocated_points": len(allocated),
            "predicted_equals_allocated": all(r["match"] for r in allocated) if allocated else None,
            "ok": all(r["match"] for r in allocated),
            "bytes_per_token_per_row": {layout(base.num_heads, k): per_token[k] for k in c.kv_heads},
            "max_context_at_budget": {f"{layout(base.num_heads, k)} B={b}": fit[(budgets[0][0], k, b)]
                                      for k in c.kv_heads for b in c.batch_sizes},
            "device_memory_stats": "available" if stats_seen else "unavailable"}


def _mib(x):
    return None if x is None else x / MIB


def _sweeps(ctx, c: Config, base, cfgs: dict) -> list[dict]:
    """Predicted against allocated bytes over context lengths and batch sizes, with their tables."""
    points = [("context", k, c.base_batch, n) for k in c.kv_heads for n in c.context_lens]
    points += [("batch", k, b, c.base_context) for k in c.kv_heads for b in c.batch_sizes]
    rows = []
    with ctx.progress(len(points), "cache sizes") as advance:
        for sweep, k, b, n in points:
            rows.append(_measure(ctx, cfgs[k], c, b, n, sweep))
            advance(note=f"{layout(base.num_heads, k)} B={b} S={n}")
    for sweep, title in (("context", f"KV cache vs context length (batch {c.base_batch})"),
                         ("batch", f"KV cache vs batch size (context {c.base_context})")):
        sel = [r for r in rows if r["sweep"] == sweep]
        ctx.table(title, ["layout", "kv heads", "batch", "context", "predicted MiB",
                          "allocated MiB", "equal", "device +MiB"],
                  [[r["layout"], r["kv_heads"], r["batch_size"], r["context_len"],
                    _mib(r["predicted_bytes"]), _mib(r["allocated_bytes"]), r["match"],
                    _mib(r["device_delta_bytes"])] for r in sel])
    if not any(r["device_stats"] != "unavailable" for r in rows):
        ctx.note(f"Device memory statistics: unavailable ({ctx.device.platform} reports none), "
                 f"so 'device +MiB' is empty; allocated bytes are KVCache.nbytes of the real arrays.")
    return rows


def _budget_tables(ctx, c: Config, base, cfgs: dict) -> tuple[list, dict]:
    """The longest context that fits each budget: ([(label, bytes)], {(label, kv heads, batch): n})."""
    budgets = [(f"{c.budget_gib:g} GiB budget", int(c.budget_gib * GIB))]
    limit = (memory_stats(ctx.device) or {}).get("bytes_limit")
    if limit:
        budgets.append((f"device limit {limit / GIB:.1f} GiB", int(limit)))
    params = {k: param_bytes_abstract(cfgs[k]) for k in c.kv_heads} if c.budget_includes_params \
        else {k: 0 for k in c.kv_heads}
    fit = {}
    for label, budget in budgets:
        table = []
        for b in c.batch_sizes:
            line = [b]
            for k in c.kv_heads:
                n = max_context(cfgs[k], b, budget - params[k], c.cache_dtype, c.cache_kind)
                fit[(label, k, b)] = n
                ctx.log({"sweep": "budget", "budget": label, "budget_bytes": budget,
                         "layout": layout(base.num_heads, k), "kv_heads": k, "batch_size": b,
                         "param_bytes": params[k], "max_context": n})
                line.append(n)
            table.append(line)
        ctx.table(f"Longest context that fits: {label}"
                  + (" minus the weights" if c.budget_includes_params else ""),
                  ["batch"] + [f"{layout(base.num_heads, k)} (kv={k})" for k in c.kv_heads], table)
    if c.budget_includes_params:
        ctx.note("Weights: " + ", ".join(f"{layout(base.num_heads, k)} {params[k] / GIB:.2f} GiB"
                                         for k in c.kv_heads)
                 + f". Positions beyond the model's max_position={base.max_position} would also "
                   "need a longer-context model; the table counts memory only.")
    return budgets, fit


def _plot(ctx, base, c: Config, rows, fit, budget_label):
    fig, axes = plots.figure(ncols=3, width=4.4)
    names = {k: f"{layout(base.num_heads, k)} (kv={k})" for k in c.kv_heads}
    for ax, sweep, key, xlabel in ((axes[0], "context", "context_len", "context length (tokens)"),
                                   (axes[1], "batch", "batch_size", "batch size")):
        xs = list(c.context_lens if sweep == "context" else c.batch_sizes)
        series = {names[k]: [next(r["predicted_bytes"] / MIB for r in rows if r["sweep"] == sweep
                                  and r["kv_heads"] == k and r[key] == x) for x in xs]
                  for k in c.kv_heads}
        fixed = f"batch {c.base_batch}" if sweep == "context" else f"context {c.base_context}"
        plots.lines(ax, xs, series, xlabel=xlabel, ylabel="KV cache MiB (predicted)",
                    title=f"KV cache vs {xlabel.split(' (')[0]}, {fixed}", logx=True, logy=True)
        alloc = [r for r in rows if r["sweep"] == sweep and r["allocated_bytes"] is not None]
        if alloc:
            ax.plot([r[key] for r in alloc], [r["allocated_bytes"] / MIB for r in alloc], "kx",
                    markersize=6, label="allocated (KVCache.nbytes)")
            ax.legend(fontsize=7)
    plots.lines(axes[2], list(c.batch_sizes),
                {names[k]: [fit[(budget_label, k, b)] or None for b in c.batch_sizes] for k in c.kv_heads},
                xlabel="batch size", ylabel="longest context (tokens)",
                title=f"Fits in {budget_label}", logx=True, logy=True)
    ctx.save_figure(fig, "memory_scaling.png")


def _hybrid(ctx, c: Config) -> list[dict]:
    """Hybrid caches (rings on windowed layers) against full ones, predicted and allocated."""
    rows = []
    for name in c.hybrid_presets:
        cfg = kvjax.ModelConfig.preset(name, dtype=ctx.dtype)
        windows = sorted({cfg.layer_window(i) for i in cfg.sliding_layers})
        for n in c.hybrid_contexts:
            full = kvjax.cache_bytes(cfg, c.base_batch, n, c.cache_dtype, kind=c.cache_kind, hybrid=False)
            hybrid = kvjax.cache_bytes(cfg, c.base_batch, n, c.cache_dtype, kind=c.cache_kind)
            row = {"sweep": "hybrid", "preset": name, "context_len": n, "batch_size": c.base_batch,
                   "windowed_layers": len(cfg.sliding_layers), "layers": cfg.num_layers,
                   "windows": windows, "full_bytes": full, "predicted_bytes": hybrid,
                   "full_over_hybrid": full / hybrid, "allocated_bytes": None, "match": None,
                   "device_stats": "unavailable"}
            if c.allocate and hybrid <= c.alloc_limit_mib * MIB:
                cache = jax.block_until_ready(kvjax.init_cache(cfg, c.base_batch, n, c.cache_dtype,
                                                               kind=c.cache_kind))
                row["allocated_bytes"] = cache.nbytes
                row["match"] = cache.nbytes == hybrid
                del cache
                gc.collect()
            ctx.log(row)
            rows.append(row)
    if rows:
        ctx.table(f"Hybrid caches: a ring of the window on windowed layers (batch {c.base_batch}, "
                  f"{c.cache_kind})",
                  ["preset", "windowed layers", "window", "context", "full MiB", "hybrid MiB",
                   "full / hybrid", "allocated MiB", "equal"],
                  [[r["preset"], f"{r['windowed_layers']}/{r['layers']}", r["windows"], r["context_len"],
                    r["full_bytes"] / MIB, r["predicted_bytes"] / MIB, round(r["full_over_hybrid"], 2),
                    None if r["allocated_bytes"] is None else r["allocated_bytes"] / MIB, r["match"]]
                   for r in rows])
    return rows
