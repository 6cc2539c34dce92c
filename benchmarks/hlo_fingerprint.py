"""Fingerprint the compiled programs of prefill and decode_step, to show that a refactor left
what runs on the device unchanged.

    python benchmarks/hlo_fingerprint.py OUT.json                 # this tree
    PYTHONPATH=/path/to/other/checkout python benchmarks/hlo_fingerprint.py OTHER.json
    python benchmarks/hlo_fingerprint.py --compare OTHER.json OUT.json

For every cache kind (dense, int8, window, sinks, kivi) it compiles the decode step and a
16-token prefill on llama-tiny (and a SnapKV prefill with budgets), then keeps each optimized
HLO instruction with names, numbering, source metadata and parameter order removed: two
fingerprints are equal when XLA compiled the same instructions, whatever the Python around
them is called. Used for issue 19 (every program equal to the landed tree's).
"""
from __future__ import annotations

import json
import re
import sys


def _normalise(hlo: str) -> list[str]:
    lines = [l for l in hlo.split("\n") if " = " in l and not l.startswith("HloModule")]
    lines = [re.sub(r"\.\d+\b", "", l) for l in lines]
    lines = [re.sub(r", metadata=\{.*?\}(?=[,\n ]|$)", "", l) for l in lines]
    lines = [re.sub(r", stack_frame_id=\d+", "", l) for l in lines]
    return [l for l in lines if "parameter(" not in l]


def fingerprints() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kvjax
    from kvjax import press as P
    from kvjax.press import host
    try:
        from kvjax.decode import decode_program, prefill_program
    except ImportError:   # a tree before issue 19 named them privately
        from kvjax.decode import _decode_jit as decode_program, _prefill_jit as prefill_program

    cfg = kvjax.ModelConfig.preset("llama-tiny")
    params = kvjax.init_params(cfg, jax.random.key(0))
    B, T = 2, 16
    tok, lens = jnp.zeros((B, T), jnp.int32), jnp.full((B,), T, jnp.int32)
    out = {}
    for kind in ("dense", "int8", "window", "sinks", "kivi"):
        extra = dict(residual_length=64) if kind == "kivi" else {}
        live = 128 if kind in ("dense", "int8") else None
        cache = kvjax.init_cache(cfg, B, 256, kind=kind, **extra)
        step = decode_program.lower(cfg, params, jnp.zeros((B,), jnp.int32), cache, live)
        out[f"{kind}/decode"] = _normalise(step.compile().as_text())
        chunk = prefill_program.lower(cfg, params, tok, lens, cache, live, None, None)
        out[f"{kind}/prefill"] = _normalise(chunk.compile().as_text())
    cache = kvjax.init_cache(cfg, B, 256, hybrid=False)
    press = P.SnapKVPress(compression_ratio=0.5, window_size=4)
    budgets = jax.tree.map(jnp.asarray, host.prefill_budgets(press, cfg, cache, np.full(B, T), "fingerprint"))
    chunk = prefill_program.lower(cfg, params, tok, lens, cache, None, press.static(), budgets)
    out["snapkv/prefill"] = _normalise(chunk.compile().as_text())
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"] and len(argv) == 3:
        a, b = (json.load(open(p)) for p in argv[1:])
        same = True
        for name in sorted(set(a) | set(b)):
            equal = a.get(name) == b.get(name)
            same &= equal
            print(f"{name:16s} {'equal' if equal else 'DIFFERENT'} ({len(a.get(name, []))} vs "
                  f"{len(b.get(name, []))} instructions)")
        return 0 if same else 1
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0], "w") as f:
        json.dump(fingerprints(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
