"""serving_bench: a synthetic serving workload through `kvjax.Engine` and through static
batches of `kvjax.generate`, on the same requests.

Workload (seeded): `requests` prompts of random token ids with lengths uniform in
`prompt_len`, each asking for an output length in `output_len` (uniform, or log-uniform:
as many per octave, a long tail; `output_dist`), greedy with no stop token, so every request
generates exactly its length; arrivals all at once (offline) or, in the online scenario, a
Poisson process of `arrival_rate` requests/s. Scenarios:

  mixed          offline, outputs varying as `output_len` says (tenfold by default);
  online         the same requests arriving at `arrival_rate` (when > 0);
  shared_prefix  offline, every prompt = one `shared_prefix`-token system prompt + a
                 suffix of `suffix_len` tokens (when shared_prefix > 0);
  same_memory    the mixed requests with the engine given the KV memory the static batches
                 allocate (`num_pages` = their peak slots / page_size) and `same_memory_slots`
                 slots (when set): what paging buys, more requests in the same memory.

Systems:
  engine  `kvjax.Engine` (max_slots, page_size, decode_steps, prefill_chunk): requests
          stream out token by token and leave as soon as they are done;
  static  batches of `static_batch` requests in arrival order, each one `kvjax.generate`
          call over right-padded prompts and max_new_tokens = the batch's longest output
          (a batch starts when its last request has arrived and the previous batch is done;
          its tokens arrive when it ends). The static times are measured per batch and laid
          on the arrival timeline.

Figures per scenario and system: throughput (generated tokens / makespan, the makespan from
the first arrival to the last token), time to first token and time per output token
(p50/p99; TPOT = (finish - first token) / (tokens - 1)), peak KV memory (the engine's peak
pages vs what the static batches allocate: batch x (longest prompt + longest output)
slots), prefix-cache hit rate and the share of prompt tokens actually computed,
compilations inside the timed runs, and how many requests got the same greedy tokens from
both systems.

Timing (kvjax.timing's rules where they apply): every system first runs the whole
workload once untimed (compiling its programs; the engine's compilations are counted
apart), then `repeats` timed runs, each on a fresh Engine (an engine's prefix cache would
otherwise serve the repeated prompts); medians are reported, compilations inside timed
runs are counted and reported (a run that compiled is marked invalid).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

import kvjax
from kvjax.timing import compile_watch

from .. import plots
from ..models import check_model, load_named
from ..schema import ConfigError, option


@dataclass(frozen=True)
class Config:
    model: str = option("text", help="any name or path kvjax.load_model takes: bundled or packaged "
                                     "name, .gguf file, checkpoint folder")
    requests: int = option(32, min=1, help="requests per scenario")
    prompt_len: tuple[int, ...] = option((16, 64), min=1, min_items=2, help="[min, max] prompt tokens (uniform)")
    output_len: tuple[int, ...] = option((8, 80), min=1, min_items=2, help="[min, max] generated tokens")
    output_dist: str = option("loguniform", choices=("uniform", "loguniform"),
                              help="output lengths: uniform, or log-uniform (as many per octave: a long tail)")
    arrival_rate: float = option(20.0, min=0.0, help="online scenario: Poisson arrivals per second (0: skip it)")
    shared_prefix: int = option(512, min=0, help="shared_prefix scenario: system prompt tokens (0: skip it)")
    suffix_len: tuple[int, ...] = option((16, 48), min=1, min_items=2,
                                         help="[min, max] tokens after the shared prefix (uniform)")
    max_slots: int = option(8, min=1, help="Engine: requests running at once")
    page_size: int = option(16, min=1, help="Engine: tokens per page")
    num_pages: int | None = option(None, min=1, help="Engine: pool pages (null: max_slots x max_len)")
    decode_steps: int = option(8, min=1, help="Engine: decode steps per host round trip")
    prefill_chunk: int = option(128, min=1, help="Engine: prompt tokens prefilled per request per iteration")
    static_batch: int = option(8, min=1, help="static baseline: requests per generate call")
    repeats: int = option(3, min=1, help="timed runs per scenario and system (median)")
    same_memory_slots: int | None = option(16, min=1, help="same_memory scenario: engine slots within the "
                                           "static batches' KV memory (null: skip it)")


def _range(name, v):
    if len(v) != 2 or v[0] > v[1]:
        raise ConfigError(f"serving_bench.{name}: give [min, max] with min <= max, got {list(v)}")


def _max_len(c: Config) -> int:
    longest = max(c.prompt_len[1], c.shared_prefix + c.suffix_len[1] if c.shared_prefix else 0)
    return longest + c.output_len[1]


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    for name in ("prompt_len", "output_len", "suffix_len"):
        _range(name, getattr(c, name))
    check_model("serving_bench.model", c.model)


@dataclass
class Workload:
    name: str
    prompts: list
    outputs: np.ndarray
    arrivals: np.ndarray       # seconds after the start


def workloads(c: Config, vocab: int, seed: int) -> list[Workload]:
    rng = np.random.default_rng(seed)
    n = c.requests
    plens = rng.integers(c.prompt_len[0], c.prompt_len[1] + 1, n)

    def outputs():
        lo, hi = c.output_len
        if c.output_dist == "uniform":
            return rng.integers(lo, hi + 1, n)
        return np.clip(np.round(np.exp(rng.uniform(np.log(lo), np.log(hi), n))), lo, hi).astype(int)
    outs = outputs()
    prompts = [[int(t) for t in rng.integers(0, vocab, k)] for k in plens]
    at_once = np.zeros(n)
    out = [Workload("mixed", prompts, outs, at_once)]
    if c.same_memory_slots:
        out.append(Workload("same_memory", prompts, outs, at_once))
    if c.arrival_rate > 0:
        gaps = rng.exponential(1.0 / c.arrival_rate, n)
        out.append(Workload("online", prompts, outs, np.cumsum(gaps) - gaps[0]))
    if c.shared_prefix:
        system = [int(t) for t in rng.integers(0, vocab, c.shared_prefix)]
        slens = rng.integers(c.suffix_len[0], c.suffix_len[1] + 1, n)
        shared = [system + [int(t) for t in rng.integers(0, vocab, k)] for k in slens]
        out.append(Workload("shared_prefix", shared, outputs(), at_once))
    return out


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def _latency(first, finish, arrivals, counts) -> dict:
    ttft = np.asarray(first) - arrivals
    tpot = [(f - s) / (k - 1) for s, f, k in zip(first, finish, counts) if k > 1]
    return {"ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
            "tpot_p50_ms": 1e3 * _pct(tpot, 50) if tpot else None,
            "tpot_p99_ms": 1e3 * _pct(tpot, 99) if tpot else None}


def run_engine(cfg, params, c: Config, w: Workload, max_len: int):
    """One run on a fresh engine; returns (row, tokens per request)."""
    eng = kvjax.Engine(cfg, params, max_slots=c.max_slots, max_len=max_len, page_size=c.page_size,
                       num_pages=c.num_pages, decode_steps=c.decode_steps, prefill_chunk=c.prefill_chunk)
    sps = [kvjax.SamplingParams(max_tokens=int(m)) for m in w.outputs]
    with compile_watch() as cw:
        t0 = time.perf_counter()
        if not w.arrivals.any():                   # offline: everything queued at once
            handles = eng.submit_many(w.prompts, sps)
        else:
            handles = []
            for p, sp, at in zip(w.prompts, sps, w.arrivals):
                wait = t0 + at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                handles.append(eng.submit(p, sp))
        outs = [h.result() for h in handles]
        end = time.perf_counter()
    eng.close()
    s = eng.stats()
    arrivals = np.array([h.submit_time - t0 for h in handles])
    first = [h.first_token_time - t0 for h in handles]
    finish = [h.finish_time - t0 for h in handles]
    tokens = sum(len(o.tokens) for o in outs)
    row = {"tokens": tokens, "seconds": end - t0, "tok_s": tokens / (end - t0),
           **_latency(first, finish, arrivals, [len(o.tokens) for o in outs]),
           "peak_kv_tokens": s["pages_peak"] * c.page_size, "pages_peak": s["pages_peak"],
           "pages_total": s["pages_total"], "prompt_tokens": s["prompt_tokens"],
           "prefill_tokens_computed": s["prefill_tokens_computed"], "cached_tokens": s["cached_tokens"],
           "prefix_hit_rate": s["cached_tokens"] / max(s["prompt_tokens"], 1),
           "computed_fraction": s["prefill_tokens_computed"] / max(s["prompt_tokens"], 1),
           "preemptions": s["preemptions"], "decode_calls": s["decode_calls"],
           "prefill_calls": s["prefill_calls"], "engine_compilations": s["compilations"],
           "timed_compiles": cw.compiles}
    return row, [o.tokens for o in outs]


def static_peak(c: Config, w: Workload) -> int:
    """KV slots the static batches allocate at most: batch x (longest prompt + longest output)."""
    peak = 0
    for i in range(0, len(w.prompts), c.static_batch):
        idx = range(i, min(i + c.static_batch, len(w.prompts)))
        peak = max(peak, len(idx) * (max(len(w.prompts[j]) for j in idx) + int(max(w.outputs[j] for j in idx))))
    return peak


def engine_settings(c: Config, w: Workload) -> Config:
    """The engine's settings for a scenario (same_memory: more slots, the static batches' memory)."""
    if w.name != "same_memory":
        return c
    return dataclasses.replace(c, max_slots=c.same_memory_slots,
                               num_pages=-(-static_peak(c, w) // c.page_size))


def run_static(cfg, params, c: Config, w: Workload):
    """Static batches in arrival order, each timed; their times laid on the arrival timeline."""
    n = len(w.prompts)
    first, finish, tokens_out = [0.0] * n, [0.0] * n, [None] * n
    clock = 0.0
    with compile_watch() as cw:
        for i in range(0, n, c.static_batch):
            idx = list(range(i, min(i + c.static_batch, n)))
            width = max(len(w.prompts[j]) for j in idx)
            new = int(max(w.outputs[j] for j in idx))
            arr = np.zeros((len(idx), width), np.int32)
            for b, j in enumerate(idx):
                arr[b, :len(w.prompts[j])] = w.prompts[j]
            lens = np.array([len(w.prompts[j]) for j in idx], np.int32)
            t = time.perf_counter()
            out = np.asarray(kvjax.generate(cfg, params, arr, prompt_lengths=lens, max_new_tokens=new).tokens)
            took = time.perf_counter() - t
            clock = max(clock, float(max(w.arrivals[j] for j in idx))) + took
            for b, j in enumerate(idx):
                first[j] = finish[j] = clock
                tokens_out[j] = [int(x) for x in out[b, :int(w.outputs[j])]]
    tokens = int(sum(w.outputs))
    row = {"tokens": tokens, "seconds": clock, "tok_s": tokens / clock,
           **_latency(first, finish, w.arrivals, [0] * n),
           "peak_kv_tokens": static_peak(c, w), "timed_compiles": cw.compiles}
    return row, tokens_out


def _median_row(rows):
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(r.get(k) is not None for r in rows):
            out[k] = float(np.median([r[k] for r in rows]))
    out["timed_compiles"] = int(sum(r["timed_compiles"] for r in rows))
    return out


def run(ctx, c: Config) -> dict:
    cfg, params, _ = load_named("serving_bench.model", c.model, ctx.dtype)
    max_len = _max_len(c)
    if cfg.positions == "learned" and max_len > cfg.max_position:
        raise ConfigError(f"serving_bench: prompts + outputs reach {max_len} positions but the model's "
                          f"learned table has {cfg.max_position}")
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    ctx.note(f"Model {c.model} ({kvjax.param_count(params):,} parameters, {cfg.dtype}); {c.requests} requests "
             f"per scenario, prompts {list(c.prompt_len)} tokens, outputs {list(c.output_len)} tokens; engine: "
             f"{c.max_slots} slots, max_len {max_len}, pages of {c.page_size}, {c.decode_steps} decode steps per "
             f"round trip, prefill chunks of {c.prefill_chunk}; static batches of {c.static_batch}. Medians of "
             f"{c.repeats} timed runs after one untimed warm-up run per system.")
    results = {w.name: _scenario(ctx, cfg, params, c, w, max_len)
               for w in ctx.track(workloads(c, min(cfg.vocab_size, 256), ctx.seed), "scenario")}
    _table(ctx, results, kv_bytes_per_token)
    summary = _summary(ctx, c, results)
    _plot(ctx, results, kv_bytes_per_token)
    return summary


def _scenario(ctx, cfg, params, c: Config, w: Workload, max_len: int) -> dict:
    """{"engine": median row, "static": median row} of one workload after the warm-up runs."""
    # warm-up until a run compiles nothing new (online arrivals may meet new shapes)
    warm_compiles = 0
    for _ in range(3):
        warm_engine, engine_tokens = run_engine(cfg, params, engine_settings(c, w), w, max_len)
        warm_compiles += warm_engine["engine_compilations"]
        if warm_engine["timed_compiles"] == 0:
            break
    _, static_tokens = run_static(cfg, params, c, w)
    same = sum(a == b for a, b in zip(engine_tokens, static_tokens))
    per = {}
    for system in ("engine", "static"):
        rows = []
        for r in range(c.repeats):
            row = (run_engine(cfg, params, engine_settings(c, w), w, max_len) if system == "engine"
                   else run_static(cfg, params, c, w))[0]
            row.update(scenario=w.name, system=system, repeat=r)
            ctx.log(row)
            rows.append(row)
        per[system] = _median_row(rows)
    per["engine"]["warmup_compilations"] = warm_compiles
    per["engine"]["same_tokens"] = same
    per["engine"]["max_slots"] = engine_settings(c, w).max_slots
    per["engine"]["pool_pages"] = per["engine"]["pages_total"]
    return per


def _table(ctx, results: dict, kv_bytes_per_token: int) -> None:
    table = []
    for name, per in results.items():
        for system in ("engine", "static"):
            r = per[system]
            table.append([name, system, r["tok_s"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["tpot_p50_ms"],
                          r["tpot_p99_ms"], r["peak_kv_tokens"] * kv_bytes_per_token / 2**20,
                          r.get("computed_fraction"), r.get("prefix_hit_rate"), r["timed_compiles"]])
    ctx.table("Engine vs static batches (medians)",
              ["scenario", "system", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
               "peak KV MiB", "prompt computed", "prefix hit", "timed compiles"], table)


def _summary(ctx, c: Config, results: dict) -> dict:
    """The headline per scenario (engine against static), with one note each."""
    summary = {"model": c.model, "requests": c.requests}
    for name, per in results.items():
        e, s = per["engine"], per["static"]
        summary[f"{name}_speedup"] = e["tok_s"] / s["tok_s"]
        summary[f"{name}_engine_tok_s"] = e["tok_s"]
        summary[f"{name}_static_tok_s"] = s["tok_s"]
        summary[f"{name}_peak_kv_ratio"] = e["peak_kv_tokens"] / s["peak_kv_tokens"]
        summary[f"{name}_computed_fraction"] = e["computed_fraction"]
        summary[f"{name}_same_tokens"] = f"{e['same_tokens']}/{c.requests}"
        ctx.note(f"{name} (engine: {e['max_slots']} slots, a pool of {e['pages_total']:.0f} pages of "
                 f"{c.page_size}): engine {e['tok_s']:,.0f} tok/s vs static {s['tok_s']:,.0f} tok/s "
                 f"({e['tok_s'] / s['tok_s']:.2f}x); TTFT p50 {e['ttft_p50_ms']:.0f} vs {s['ttft_p50_ms']:.0f} ms; "
                 f"peak KV {e['peak_kv_tokens']} vs {s['peak_kv_tokens']} token slots; prompt tokens computed "
                 f"{100 * e['computed_fraction']:.0f}% (prefix hits {100 * e['prefix_hit_rate']:.0f}%), "
                 f"{e['preemptions']:.0f} preemptions; same greedy tokens for {e['same_tokens']}/{c.requests} "
                 f"requests; engine compilations {e['warmup_compilations']} in warm-up, "
                 f"{e['timed_compiles']} in timed runs.")
    summary["compilations"] = sum(per["engine"]["warmup_compilations"] for per in results.values())
    summary["timed_compiles"] = sum(per[s]["timed_compiles"] for per in results.values() for s in per)
    return summary


def _plot(ctx, results: dict, kv_bytes_per_token: int) -> None:
    names = list(results)
    fig, axes = plots.figure(ncols=3, width=4.4)
    x = np.arange(len(names))
    for k, system in enumerate(("engine", "static")):
        axes[0].bar(x + (k - 0.5) * 0.4, [results[n][system]["tok_s"] for n in names], 0.4, label=system)
        axes[1].bar(x + (k - 0.5) * 0.4, [results[n][system]["ttft_p50_ms"] for n in names], 0.4, label=system)
        axes[2].bar(x + (k - 0.5) * 0.4, [results[n][system]["peak_kv_tokens"] * kv_bytes_per_token / 2**20
                                          for n in names], 0.4, label=system)
    for ax, title, ylabel in ((axes[0], "Throughput", "generated tokens/s"),
                              (axes[1], "Time to first token (p50)", "ms"),
                              (axes[2], "Peak KV memory", "MiB")):
        ax.set_xticks(x, names)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ctx.save_figure(fig, "serving_bench.png")
