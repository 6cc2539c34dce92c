"""Ready means ready: the first burst of requests after `kvjax serve` starts, against the
second, with each warm-up mode (issue 23, part 5).

    python benchmarks/serve_bursts.py [--model text] [--max-slots 8] [--max-len 160]
                                      [--requests 16] [--max-tokens 16] [--out results.json]

Three server lives, each a `kvjax serve` subprocess on a free port:

  basic        --warmup basic --compilation-cache none (short prompts at each batch size only)
  full, cold   --warmup full  with an empty persistent compilation cache
  full, warm   --warmup full  again, restarted on the cache the cold run filled

In each, once the server listens, two bursts of `--requests` concurrent completions with
prompts of random lengths (token-id windows of CPython's documentation, 1 to
max_len - max_tokens tokens; greedy, `--max-tokens` each; the second burst's prompts are
new ones of the same distribution) are sent and timed, and /metrics says how many programs
the engine compiled during each burst. Reported: start-up seconds (process start to
listening), each burst's wall time and the slowest request's time in it, compilations.

Needs the serve extra (pip install -e ".[serve]"); the packaged models need their package.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

LISTENING = re.compile(r"serving .* on (http://\S+)/v1")


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _compilations(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("kvjax_engine_compilations "):
                return float(line.split()[1])
    raise RuntimeError("/metrics has no kvjax_engine_compilations")


def _start(args, warmup: str, cache: str) -> tuple[subprocess.Popen, str, float, list]:
    """A `kvjax serve` process; returns (process, base URL, seconds until it listened, log)."""
    cmd = [sys.executable, "-m", "kvjax.cli", "serve", "--model", args.model, "--port", "0",
           "--max-slots", str(args.max_slots), "--max-len", str(args.max_len),
           "--warmup", warmup, "--compilation-cache", cache, "--log-level", "warning"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log = []
    for line in proc.stderr:
        log.append(line.rstrip())
        m = LISTENING.search(line)
        if m:
            threading.Thread(target=lambda: [log.append(x.rstrip()) for x in proc.stderr], daemon=True).start()
            _wait_healthy(m.group(1))        # the line comes just before uvicorn listens
            return proc, m.group(1), time.perf_counter() - t0, log
    raise RuntimeError("kvjax serve exited before listening:\n" + "\n".join(log[-30:]))


def _wait_healthy(base: str, timeout: float = 120.0):
    end = time.perf_counter() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.perf_counter() > end:
                raise
        time.sleep(0.02)


def _burst(base: str, prompts: list[list[int]], max_tokens: int) -> dict:
    def one(ids):
        t = time.perf_counter()
        r = _post(f"{base}/v1/completions", {"prompt": ids, "max_tokens": max_tokens, "temperature": 0})
        return time.perf_counter() - t, r["usage"]["completion_tokens"]

    before = _compilations(base)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "slowest_request_s": max(d[0] for d in done),
            "tokens": sum(d[1] for d in done), "compilations": _compilations(base) - before}


def _prompts(args, corpus_ids: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    longest = args.max_len - args.max_tokens
    out = []
    for _ in range(args.requests):
        n = int(rng.integers(1, longest + 1))
        start = int(rng.integers(0, len(corpus_ids) - n))
        out.append([int(x) for x in corpus_ids[start:start + n]])
    return out


def _corpus_ids(base: str) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(list(topics.topics.values())[:40])[:60_000]
    ids = _post(f"{base}/tokenize", {"prompt": text})["tokens"]
    return [int(x) for x in ids]


def life(args, name: str, warmup: str, cache: str) -> dict:
    proc, base, start_s, log = _start(args, warmup, cache)
    try:
        corpus = _corpus_ids(base)
        row = {"life": name, "warmup": warmup, "startup_s": start_s}
        for i in (1, 2):
            b = _burst(base, _prompts(args, corpus, seed=i), args.max_tokens)
            row.update({f"burst{i}_{k}": v for k, v in b.items()})
        row["warmup_log"] = [x for x in log if "warm-up done" in x]
        return row
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="text")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvjax-burst-cache-") as cache:
        for name, warmup, where in (("basic", "basic", "none"), ("full, cold cache", "full", cache),
                                    ("full, warm cache (restart)", "full", cache)):
            rows.append(life(args, name, warmup, where))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, {args.max_slots} slots, max_len {args.max_len}, "
          f"{args.requests} concurrent requests x {args.max_tokens} tokens, prompts 1-{args.max_len - args.max_tokens} tokens\n")
    print("| server life | start-up s | burst 1 s (slowest request) | compiled | burst 2 s (slowest) | compiled |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['life']} | {r['startup_s']:.1f} | {r['burst1_wall_s']:.2f} ({r['burst1_slowest_request_s']:.2f}) "
              f"| {r['burst1_compilations']:.0f} | {r['burst2_wall_s']:.2f} ({r['burst2_slowest_request_s']:.2f}) "
              f"| {r['burst2_compilations']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
