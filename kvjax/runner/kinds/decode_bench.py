"""decode_bench: decode latency against live context and batch, with model bandwidth utilisation.

Models: `presets` are kvjax.ModelConfig shapes with random weights (`model:` overrides
their fields, e.g. a smaller vocab; it applies to presets only); `models` are real
checkpoints by `kvjax.load_model` name (a packaged name such as smollm2-135m-instruct or
gemma3-270m, a .gguf path, a Hugging Face folder or a bundled name), run on their own
weights in the run's dtype. Either list may be empty, not both; an unknown or uninstalled
model is a config error naming `decode_bench.models` before anything is loaded.

For each model, batch size B and live context C:

  * per-step latency: generate's decode program (a loop of `new_tokens` greedy steps
    on a donated cache) timed on its own after a prompt of C tokens prefilled once outside
    the timed region (`kvjax.bench.time_decode`): warm, calibrated so one measurement lasts
    at least `min_seconds`, `repeats` measurements; median, minimum and spread reported,
    compilation (seconds and count) apart. Prefill is timed the same way on its own;
  * MBU = (parameter bytes + live KV bytes) / step time / bandwidth, where the live KV
    bytes are those of the mean live context over the timed steps (C + (N + 1) / 2) and
    the bandwidth is measured by this run on this device: a jitted elementwise copy of
    `copy_mib` MiB into its own (donated) buffer, counting bytes read plus written (the
    spec-sheet figure is printed beside it where the device is known). `MBU read` divides
    by a read stream instead (a jitted sum over `copy_mib` MiB), the roofline of a step
    that reads every weight and writes little: on a CPU a read stream can run well below
    the copy's reads plus writes (32 vs 50 GB/s on the 2-core VM of BUILD_NOTES), so MBU
    against the copy can stay far from 1 even for a step at the machine's read limit. On a CPU, MBU is
    given only for rows whose bytes per step exceed the CPU's last-level cache (read from
    sysfs): a step streams every weight once, so they cannot stay cached from one step to
    the next and bytes / time is memory bandwidth, as on an accelerator (a real model such
    as SmolLM2 in float32, 538 MB, against a 300 MiB L3). Rows that fit in the cache
    (small random shapes) leave MBU out: bytes / time would be cache bandwidth;
  * length awareness (`length_check`): the same measurement at `long_max_len` slots with
    `short_live` live tokens against `short_max_len` slots (the step should follow the
    live context, not the allocation);
  * transformers (when installed and `hf: true`): its decode loop with its default
    dynamic cache and with a static cache, measured the same way right after kvjax's row
    (`kvjax.baselines.hf_step_timing`), and the kvjax / transformers speed ratios. For a
    preset, a transformers model of the same shape and dtype (random weights); for a real
    model, transformers' own load of the same checkpoint (`kvjax.baselines.hf_pretrained`:
    a GGUF file through its GGUF loader), so both run the same weights.

The load average at the start and end of the run is recorded (summary and notes; env.json
has the start's): the machine may be shared, and the figures are only as quiet as it was.
Impossible results are refused, not printed as numbers: a row whose timing is not positive,
whose spread is wider than its median, that compiled inside the timed region, or whose MBU
exceeds 100% where MBU is given is marked invalid with the reason; ratios use valid rows
only, and the summary counts the invalid rows (`invalid_rows`).
Combinations whose weights and cache do not fit the device (memory_stats limit) are
skipped with a note, never silently.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.baselines import checkpoint_path, hf_model_like, hf_pretrained, hf_step_timing
from kvjax.bench import time_decode, time_prefill
from kvjax.models import ModelNotInstalled
from kvjax.timing import measure

from .. import plots
from ..env import last_level_cache_bytes, load_average, memory_stats
from ..schema import ConfigError, option

# Spec-sheet HBM bandwidth (GB/s) by device_kind substring, for reference only.
SPEC_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "TPU v5 lite": 819.0,
            "TPU v4": 1200.0}


@dataclass(frozen=True)
class Config:
    presets: tuple[str, ...] = option(("llama-1b", "llama-7b"), min_items=0,
                                      help="model shapes (kvjax.ModelConfig presets), random weights; "
                                      "[] to run only `models`")
    model: dict = option({}, help="ModelConfig overrides applied to every preset (e.g. a smaller vocab); "
                         "presets only, never to `models`")
    models: tuple[str, ...] = option((), min_items=0,
                                     help="real models by kvjax.load_model name (e.g. smollm2-135m-instruct, "
                                     "gemma3-270m, a .gguf path, a Hugging Face folder): their own weights, "
                                     "and transformers on the same checkpoint when hf is true")
    batch_sizes: tuple[int, ...] = option((1, 16, 64), min=1, min_items=1, help="batch sizes")
    contexts: tuple[int, ...] = option((128, 512, 1024, 2048, 4096), min=1, min_items=1,
                                       help="live context (prompt tokens) before the timed steps")
    new_tokens: int = option(32, min=1, help="N: decode steps in one timed call of the decode loop")
    repeats: int = option(5, min=2, help="timed measurements per figure (median, min and spread)")
    min_seconds: float = option(0.2, min=0.0, help="calibrated length of one measurement (s)")
    copy_mib: int = option(1024, min=1, help="size of the bandwidth-measuring copy (MiB); on a CPU, make "
                           "it larger than the last-level cache")
    length_check: bool = option(True, help="also time the short vs long allocation check below")
    short_max_len: int = option(512, min=2, help="length check: cache slots of the short cache")
    long_max_len: int = option(8192, min=2, help="length check: cache slots of the long cache")
    short_live: int = option(256, min=1, help="length check: live tokens in both caches")
    hf: bool = option(True, help="also time transformers' decode loop (dynamic and static cache)")
    hf_max_batch: int = option(64, min=1, help="largest batch given to transformers")
    time_budget_s: float = option(0.0, min=0.0, help="stop starting new combinations after this many "
                                  "seconds (0: no limit); skipped ones are listed in a note")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    if not c.presets and not c.models:
        raise ConfigError("decode_bench.presets: both presets and models are empty; name at least one model")
    for p in c.presets:
        try:
            kvjax.ModelConfig.preset(p).replace(**c.model)
        except ValueError as e:
            raise ConfigError(f"decode_bench.presets: {e}") from None
    for i, name in enumerate(c.models):
        try:
            checkpoint_path(name)   # resolves names and paths only: nothing is loaded
        except (FileNotFoundError, ModelNotInstalled) as e:
            raise ConfigError(f"decode_bench.models[{i}]: {e}") from None
    if c.length_check and c.short_live + c.new_tokens > c.short_max_len:
        raise ConfigError(f"decode_bench.short_live: short_live + new_tokens = "
                          f"{c.short_live + c.new_tokens} exceeds short_max_len={c.short_max_len}")


def measure_bandwidth(mib: int, repeats: int, min_seconds: float) -> float:
    """GB/s of a jitted elementwise copy (bytes read + bytes written), calibrated and repeated.

    The input is donated, so every call writes into the buffer it read, as a decode step
    writes into its donated cache: a fresh output each call would measure, on a CPU, the
    page faults of a new allocation (3 GB/s here against 16-25 GB/s in place).
    """
    n = mib * 2**20 // 4
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    _, t = measure(copy, jnp.zeros(n, jnp.float32), repeats=repeats, min_seconds=min_seconds)
    return 2 * n * 4 / t.median_s / 1e9


def measure_read_bandwidth(mib: int, repeats: int, min_seconds: float) -> float:
    """GB/s of a jitted sum over `mib` MiB (bytes read only), calibrated and repeated.

    A decode step mostly reads (every weight once, the live cache) and writes little, so a
    read stream, not a copy, is its roofline. On the 2-core CPU VM of BUILD_NOTES a read
    stream runs at ~32 GB/s against the copy's 50 GB/s of reads plus writes: no program
    that only reads its weights can reach more than ~0.64 of the copy figure there.
    """
    n = mib * 2**20 // 4
    total = jax.jit(lambda a, prev: jnp.sum(a) + 0.0 * prev)   # each call waits for the last
    _, t = measure(lambda st: (st[0], total(*st)), (jnp.ones(n, jnp.float32), jnp.float32(0)),
                   repeats=repeats, min_seconds=min_seconds)
    return n * 4 / t.median_s / 1e9


def _kvjax_timings(cfg, params, B, C, N, c: Config, seed, max_len=None):
    """(decode Timing per step, prefill Timing) at live context C."""
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, C), dtype=np.int32)
    lens = np.full((B,), C, np.int32)
    max_len = max_len or C + N
    kw = dict(repeats=c.repeats, min_seconds=c.min_seconds)
    _, step = time_decode(cfg, params, prompts, lens, kvjax.init_cache(cfg, B, max_len), N, **kw)
    _, pre = time_prefill(cfg, params, prompts, lens, kvjax.init_cache(cfg, B, max_len), **kw)
    return step, pre


def _fits(cfg, B, max_len, pbytes, device) -> bool:
    stats = memory_stats(device)
    limit = (stats or {}).get("bytes_limit")
    need = pbytes + 2 * kvjax.cache_bytes(cfg, B, max_len)   # cache + the donated copy in flight
    return limit is None or need < 0.9 * limit


def _label(name: str) -> str:
    """A real model's name in rows and summary keys: the name, or a path's last part."""
    return Path(name).stem if ("/" in name or name.endswith(".gguf")) else name


def _models(ctx, c: Config):
    """(label, cfg, params, transformers model or None) for each preset, then each real model;
    one at a time, so only one model's weights are held."""
    for preset in c.presets:
        cfg = kvjax.ModelConfig.preset(preset).replace(dtype=ctx.dtype, **c.model)
        yield preset, cfg, kvjax.init_params(cfg, jax.random.key(ctx.seed)), (
            hf_model_like(cfg) if c.hf else None)
    for name in c.models:
        cfg, params, _ = kvjax.load_model(name, dtype=ctx.dtype)
        yield _label(name), cfg, params, (hf_pretrained(name, ctx.dtype) if c.hf else None)
        gc.collect()


def run(ctx, c: Config) -> dict:
    load_start = load_average()
    bw = measure_bandwidth(c.copy_mib, c.repeats, c.min_seconds)
    read_bw = measure_read_bandwidth(c.copy_mib, c.repeats, c.min_seconds)
    llc = last_level_cache_bytes() if ctx.device.platform == "cpu" else None
    spec = next((v for k, v in SPEC_GBS.items() if k in ctx.device.device_kind), None)
    _intro_notes(ctx, c, bw, read_bw, spec, llc, load_start)
    rows, headline = [], {"bandwidth_gb_s": bw, "read_bandwidth_gb_s": read_bw, "spec_gb_s": spec, "last_level_cache_bytes": llc,
                          "load_average_start": load_start}
    start, skipped = time.perf_counter(), []
    over_budget = lambda: c.time_budget_s and time.perf_counter() - start > c.time_budget_s  # noqa: E731
    for label, cfg, params, hf in _models(ctx, c):
        rows += _grid(ctx, c, label, cfg, params, hf, (bw, read_bw), llc, over_budget, skipped)
        if not c.length_check:
            continue
        if over_budget():
            skipped.append(f"{label} length check")
            continue
        _length_check(ctx, c, label, cfg, params, headline)

    if skipped:
        ctx.note(f"Time budget of {c.time_budget_s:.0f} s reached: not measured: {', '.join(skipped)}")
        headline["skipped_for_time"] = skipped
    if not rows:
        raise RuntimeError("decode_bench measured nothing: every combination was skipped")
    _report(ctx, c, rows, headline)
    headline["load_average_end"] = load_average()
    ctx.note(f"Load average (1/5/15 min) at the start {load_start}, at the end {headline['load_average_end']}"
             f" on {ctx.device.device_kind}: a load above the cores' count means other work shared them.")
    return headline


def _intro_notes(ctx, c: Config, bw: float, read_bw: float, spec, llc, load_start) -> None:
    ctx.note(f"Measured copy bandwidth {bw:,.1f} GB/s (read + write, {c.copy_mib} MiB in place) and "
             f"read bandwidth {read_bw:,.1f} GB/s (a sum over {c.copy_mib} MiB) on "
             f"{ctx.device.device_kind}" + (f"; spec sheet {spec:,.0f} GB/s" if spec else "")
             + f". dtype {ctx.dtype}. Step times: generate's decode loop ({c.new_tokens} steps per "
             f"call) on a prefilled cache, {c.repeats} measurements of >= {c.min_seconds} s each "
             f"(median; min and spread in metrics), compilation excluded. MBU is against the copy "
             f"figure; 'MBU read' against the read stream, the roofline of a step that reads its "
             f"weights and writes little. Load average at the start {load_start}.")
    if ctx.device.platform != "cpu":
        return
    cache = f"{llc / 2**20:,.0f} MiB" if llc else "unknown"
    ctx.note(f"MBU on CPU: given only for rows whose weights + live KV exceed the last-level cache "
             f"({cache}, sysfs). A decode step reads every weight once, so weights larger than the "
             f"cache cannot stay in it from one step to the next: bytes / step time is memory "
             f"bandwidth, as on an accelerator, and the ratio to the copy's bandwidth is valid. "
             f"Rows that fit in the cache leave it out (bytes / time would be cache bandwidth).")
    if llc and c.copy_mib * 2**20 <= llc:
        ctx.note(f"WARNING: the bandwidth copy ({c.copy_mib} MiB) fits in the last-level cache "
                 f"({cache}): it measures cache, not memory, bandwidth; raise copy_mib.")


def _grid(ctx, c: Config, preset: str, cfg, params, hf, bw: tuple[float, float], llc, over_budget,
          skipped: list) -> list[dict]:
    """One row per (batch, context) of this model that fits and the time budget allows."""
    pbytes = kvjax.param_bytes(params)
    combos = [(B, C) for B in c.batch_sizes for C in c.contexts]
    rows = []
    with ctx.progress(len(combos), preset) as advance:
        for B, C in combos:
            advance(note=f"B={B} C={C}")
            if over_budget():
                skipped.append(f"{preset} B={B} C={C}")
                continue
            if C + c.new_tokens > cfg.max_position and cfg.positions == "learned":
                continue
            if not _fits(cfg, B, C + c.new_tokens, pbytes, ctx.device):
                ctx.note(f"skipped {preset} B={B} C={C}: weights + cache exceed device memory")
                continue
            row = _grid_row(ctx, c, preset, cfg, params, pbytes, hf, B, C, bw, llc)
            ctx.log(row)
            rows.append(row)
    return rows


def mbu_counted(platform: str, step_bytes: int, llc: int | None) -> bool:
    """Whether bytes / step time measures memory bandwidth: always on an accelerator; on a
    CPU only when a step's bytes exceed the last-level cache (unknown cache: never)."""
    return platform != "cpu" or (llc is not None and step_bytes > llc)


def _grid_row(ctx, c: Config, preset, cfg, params, pbytes: int, hf, B: int, C: int,
              bw: tuple[float, float], llc) -> dict:
    """kvjax's decode step and prefill at batch B and context C (then transformers', if asked)."""
    step, pre = _kvjax_timings(cfg, params, B, C, c.new_tokens, c, ctx.seed + B + C)
    live_kv = kvjax.cache_bytes(cfg, B, C + (c.new_tokens + 1) // 2) - 4 * B
    row = {"preset": preset, "batch": B, "context": C, **step.fields("step"),
           "tok_s": B / step.median_s, **pre.fields("prefill"),
           "param_bytes": pbytes, "live_kv_bytes": live_kv, "mbu": None, "mbu_read": None}
    if mbu_counted(ctx.device.platform, pbytes + live_kv, llc):
        gbs = (pbytes + live_kv) / step.median_s / 1e9
        row["mbu"], row["mbu_read"] = gbs / bw[0], gbs / bw[1]
        if max(row["mbu"], row["mbu_read"]) > 1.0:
            step.invalidate(f"{gbs:,.1f} GB/s exceeds the measured bandwidth (copy {bw[0]:,.1f}, "
                            f"read {bw[1]:,.1f} GB/s)")
    row["valid"] = step.valid and pre.valid
    row["invalid_reason"] = "; ".join(r for r in (step.reason, pre.reason) if r) or None
    if hf is not None and B <= c.hf_max_batch:
        for name, impl in (("hf_default", None), ("hf_static", "static")):
            t = hf_step_timing(hf, cfg.vocab_size, B, C, c.new_tokens, impl, seed=ctx.seed,
                               repeats=c.repeats, min_seconds=c.min_seconds)
            row.update(t.fields(name))
            row[f"speedup_vs_{name}"] = (t.median_s / step.median_s
                                         if t.valid and row["valid"] else None)
    return row


def _length_check(ctx, c: Config, preset: str, cfg, params, headline: dict) -> None:
    """Length awareness: the same live tokens in a short and a long allocation."""
    short, _ = _kvjax_timings(cfg, params, 1, c.short_live, c.new_tokens, c, ctx.seed, c.short_max_len)
    if not _fits(cfg, 1, c.long_max_len, kvjax.param_bytes(params), ctx.device):
        return
    long, _ = _kvjax_timings(cfg, params, 1, c.short_live, c.new_tokens, c, ctx.seed, c.long_max_len)
    valid = short.valid and long.valid
    ctx.log({"preset": preset, "length_check": True, "short_max_len": c.short_max_len,
             "long_max_len": c.long_max_len, "live": c.short_live,
             **short.fields("short_step"), **long.fields("long_step"), "valid": valid})
    if valid:
        ratio = long.median_s / short.median_s
        ctx.note(f"{preset}: {c.short_live} live tokens, step {1e3 * short.median_s:.3f} ms at "
                 f"max_len {c.short_max_len} vs {1e3 * long.median_s:.3f} ms at max_len "
                 f"{c.long_max_len} ({100 * (ratio - 1):+.1f}%)")
        headline[f"{preset}_long_vs_short"] = ratio
    else:
        ctx.note(f"{preset}: length check INVALID ({short.reason or long.reason})")


def _report(ctx, c: Config, rows: list[dict], headline: dict) -> None:
    cols = ["model", "batch", "context", "step ms", "min ms", "spread ms", "tok/s", "MBU", "MBU read",
            "prefill ms", "compile s", "valid"]
    has_hf = any("hf_static_ms" in r for r in rows)
    if has_hf:
        cols += ["hf default ms", "hf static ms", "x default", "x static"]
    table = []
    for r in rows:
        line = [r["preset"], r["batch"], r["context"], r["step_ms"], r["step_min_ms"], r["step_spread_ms"],
                r["tok_s"], r["mbu"], r["mbu_read"], r["prefill_ms"], r["step_compile_s"],
                "yes" if r["valid"] else f"NO: {r['invalid_reason']}"]
        if has_hf:
            line += [r.get("hf_default_ms"), r.get("hf_static_ms"),
                     r.get("speedup_vs_hf_default"), r.get("speedup_vs_hf_static")]
        table.append(line)
    ctx.table("Decode step vs live context", cols, table)

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plots.figure(ncols=len(presets))
    for ax, preset in zip(axes, presets):
        series = {}
        for B in c.batch_sizes:
            pts = {r["context"]: r["step_ms"] for r in rows
                   if r["preset"] == preset and r["batch"] == B and r["valid"]}
            if pts:
                series[f"batch {B}"] = [pts.get(C) for C in c.contexts]
        plots.lines(ax, list(c.contexts), series, xlabel="live context (tokens)", ylabel="ms per step",
                    title=f"{preset} decode, {ctx.dtype}", logx=True)
    ctx.save_figure(fig, "decode_bench.png")
    invalid = [r for r in rows if not r["valid"]]
    for r in rows:
        if r["valid"]:
            key = f"{r['preset']}_b{r['batch']}_c{r['context']}"
            headline[f"{key}_step_ms"] = r["step_ms"]
            headline[f"{key}_tok_s"] = r["tok_s"]
            if r["mbu"] is not None:
                headline[f"{key}_mbu"] = r["mbu"]
                headline[f"{key}_mbu_read"] = r["mbu_read"]
    headline["invalid_rows"] = len(invalid)
    if invalid:
        ctx.note(f"{len(invalid)} of {len(rows)} rows are INVALID and left out of every ratio: "
                 + "; ".join(f"B={r['batch']} C={r['context']}: {r['invalid_reason']}" for r in invalid))
    else:
        ctx.note(f"All {len(rows)} rows valid (positive times, spread within the median"
                 + (", MBU <= 100% where given" if any(r["mbu"] is not None for r in rows) else "")
                 + ").")
