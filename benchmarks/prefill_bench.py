"""Long-prompt prefill on a real model: kvjax (one call and chunked) against transformers.

    python benchmarks/prefill_bench.py --model smollm2-135m-instruct --tokens 8192
    python benchmarks/prefill_bench.py --model gemma3-270m --tokens 16384 --methods chunked

Each method runs in its own subprocess (so its peak RSS is its own) on the same prompt
(the README repeated to `--tokens` tokens, batch 1, float32):

  chunked      kvjax.prefill with prefill_chunk=--chunk (the default path)
  one_call     kvjax.prefill with prefill_chunk=None (the whole prompt in one program)
  transformers AutoModelForCausalLM loaded from the same GGUF, one forward with use_cache

Reported per method: the first call's wall time (what a user waits for: compilation
included for kvjax), a second call's wall time on a fresh cache (warm: no compilation),
the compile count, peak RSS of the process (model and runtime included) and the
last-position logits' largest difference from transformers. The machine's load average
before and after is printed: on a shared machine the times are not comparable across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _prompt(tok, n: int) -> list[int]:
    text = (ROOT / "README.md").read_text()
    ids = tok.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _kvjax(model: str, n: int, chunk: int | None) -> dict:
    import jax

    import kvjax

    compiles = []     # (seconds) of every XLA compilation, from JAX's own monitoring events
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compiles.append(secs) if event.endswith("backend_compile_duration") else None)
    cfg, params, tok = kvjax.load_model(model)
    ids = np.array([_prompt(tok, n)], np.int32)
    lens = np.array([n], np.int32)
    out = {}
    for run in ("first", "second"):
        before = len(compiles)
        t0 = time.perf_counter()
        logits, cache = kvjax.prefill(cfg, params, ids, lens, kvjax.init_cache(cfg, 1, n),
                                      prefill_chunk=chunk)
        logits = np.asarray(jax.block_until_ready(logits))
        out[f"{run}_s"] = time.perf_counter() - t0
        out[f"{run}_compiles"] = len(compiles) - before
        out[f"{run}_compile_s"] = sum(compiles[before:])
        del cache
    out["logits"] = logits[0].tolist()
    return out


def _transformers(model: str, n: int) -> dict:
    import torch
    import transformers

    from kvjax.gguf import GGUFFile, GGUFTokenizer
    from kvjax.models import packaged_path

    path = packaged_path(model)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()

    ids = torch.tensor([_prompt(GGUFTokenizer(GGUFFile(path)), n)])
    out = {}
    with torch.no_grad():
        for run in ("first", "second"):
            t0 = time.perf_counter()
            logits = m(ids, use_cache=True, logits_to_keep=1).logits[0, -1]
            out[f"{run}_s"] = time.perf_counter() - t0
    out["logits"] = logits.numpy().tolist()
    out["threads"] = torch.get_num_threads()
    return out


def child(method: str, model: str, n: int, chunk: int) -> None:
    if method == "transformers":
        out = _transformers(model, n)
    else:
        out = _kvjax(model, n, chunk if method == "chunked" else None)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["chunked", "transformers", "one_call"],
                    choices=["chunked", "one_call", "transformers"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.model, a.tokens, a.chunk)
        return 0
    results = {"model": a.model, "tokens": a.tokens, "chunk": a.chunk, "load_before": os.getloadavg()}
    for m in a.methods:
        p = subprocess.run([sys.executable, __file__, "--child", m, "--model", a.model, "--tokens",
                            str(a.tokens), "--chunk", str(a.chunk)], capture_output=True, text=True,
                           cwd=ROOT)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(p.stdout[-2000:], p.stderr[-4000:])
            raise SystemExit(f"{m} failed (rc {p.returncode})")
        results[m] = json.loads(line[-1][7:])
    results["load_after"] = os.getloadavg()
    ref = np.array(results["transformers"]["logits"]) if "transformers" in results else None
    print(f"{a.model}, {a.tokens} prompt tokens, batch 1, float32; load average "
          f"{results['load_before'][0]:.2f} -> {results['load_after'][0]:.2f}")
    print(f"{'method':<14}{'first call s':>14}{'second call s':>15}{'compiles (s)':>16}{'peak RSS GB':>13}"
          f"{'max |dlogit|':>14}")
    for m in a.methods:
        r = results[m]
        diff = "" if ref is None else f"{np.abs(np.array(r['logits']) - ref).max():.2e}"
        comp = f"{r['first_compiles']} ({r['first_compile_s']:.1f})" if "first_compiles" in r else "-"
        print(f"{m:<14}{r['first_s']:>14.1f}{r['second_s']:>15.1f}{comp:>16}"
              f"{r['peak_rss_gb']:>13.2f}{diff:>14}")
    if a.json:
        for m in a.methods:
            results[m].pop("logits")
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
