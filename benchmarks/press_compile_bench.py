"""Compile time of every press's prefill on a real 30-layer model (issue 21 part 5).

    python benchmarks/press_compile_bench.py                       # SmolLM2-135M, 300 tokens
    python benchmarks/press_compile_bench.py --presses "AdaKV(ExpectedAttention)" Knorm
    python benchmarks/press_compile_bench.py --model smollm2-135m-instruct --tokens 300 --json out.json

Presses: press_benchmark's DEFAULT_PRESSES (kvjax/runner/kinds/press_benchmark.py, built
with its `make_press` and default settings, ratio --ratio) plus KVzip (its reconstruction
prompt from the model's own chat template). Each press prefills --batch rows of --tokens
tokens (the README, tokenized; KVzip's rows start with the template's user prefix) into an
empty cache sized for what it keeps (`kvjax.press.init_cache`), twice:

  compile s   seconds JAX reports for the first call's compilations (tracing, lowering and
              XLA; `kvjax.timing.compile_watch`); XLA s: the backend (XLA) part alone
  first s     the first call's wall time (compilation + one run)
  warm s      a second call on a fresh cache (nothing compiles)
  CPU s       the process's CPU seconds over the first call (all threads): on a shared
              machine less sensitive to other work than the wall times

Before issue 21 part 5, AdaKV(ExpectedAttention) spent minutes here (XLA constant-folded
its empty pool's attention block in every layer); see BUILD_NOTES.md, "Press compile times
on a 30-layer model". The load average is printed beside every press: on a shared machine
compile times are only comparable within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def _ids(tok, n: int, kvzip: bool) -> list[int]:
    text = (ROOT / "README.md").read_text()
    while True:
        if kvzip:
            from kvjax.press import chat_context
            ids, _ = chat_context(tok, text)
        else:
            ids = tok.encode(text)
        if len(ids) >= n:
            return list(ids[:n])
        text = text + "\n" + text


def _press(name: str, ratio: float, tok):
    from kvjax import press as P
    from kvjax.runner.kinds.press_benchmark import Config, make_press

    if name == "KVzip":
        return P.KVzipPress(ratio, tokenizer=tok)
    return make_press(name, ratio, Config())


def run(model: str, presses: list[str], tokens: int, batch: int, ratio: float) -> list[dict]:
    import jax

    import kvjax
    from kvjax import press as P
    from kvjax.timing import compile_watch

    backend = []    # seconds of each XLA compilation, from JAX's monitoring events
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: backend.append(secs) if event.endswith("backend_compile_duration") else None)
    t0 = time.perf_counter()
    cfg, params, tok = kvjax.load_model(model)
    print(f"{model}: {cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, "
          f"loaded in {time.perf_counter() - t0:.1f} s; {batch} x {tokens} tokens, ratio {ratio}; "
          f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
    rows = []
    for name in presses:
        p = _press(name, ratio, tok)
        ids = np.array([_ids(tok, tokens, name == "KVzip")] * batch, np.int32)
        lens = np.full((batch,), tokens, np.int32)
        load_before = _load()
        row = {"press": name, "load_before": load_before}
        for run_ in ("first", "warm"):
            cache = P.init_cache(cfg, batch, tokens, p)
            jax.block_until_ready(cache)
            n0, cpu0 = len(backend), time.process_time()
            with compile_watch() as cw:
                logits, cache = kvjax.prefill(cfg, params, ids, lens, cache, press=p)
                jax.block_until_ready((logits, cache))
            row[f"{run_}_s"], row[f"{run_}_cpu_s"] = cw.wall_s, time.process_time() - cpu0
            if run_ == "first":
                row.update(compiles=cw.compiles, compile_s=cw.compile_s, xla_s=sum(backend[n0:]))
            else:
                row["warm_compiles"] = cw.compiles
        row["load_after"] = _load()
        rows.append(row)
        print(f"  {name:28s} compile {row['compile_s']:7.1f} s (XLA {row['xla_s']:6.1f} s, "
              f"{row['compiles']} programs)  first {row['first_s']:7.1f} s (CPU {row['first_cpu_s']:6.1f} s)  "
              f"warm {row['warm_s']:6.2f} s (CPU {row['warm_cpu_s']:5.2f} s)  "
              f"load {load_before} -> {row['load_after']}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| press | compile s | XLA s | programs | first call s | first call CPU s | warm call s | "
           "load avg (1/5/15 min) before |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['press']} | {r['compile_s']:.1f} | {r['xla_s']:.1f} | {r['compiles']} | "
                   f"{r['first_s']:.1f} | {r['first_cpu_s']:.1f} | {r['warm_s']:.2f} | {r['load_before']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from kvjax.runner.kinds.press_benchmark import DEFAULT_PRESSES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES) + ["KVzip"])
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    rows = run(a.model, a.presses, a.tokens, a.batch, a.ratio)
    print()
    print(table(rows))
    print("uptime:", os.popen("uptime").read().strip())
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
