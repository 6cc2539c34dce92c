"""KIVI-2/4 quality on the real models, and why 2-bit is as good or bad as it is (issue 21, part 6).

    python benchmarks/kivi_quality.py --model smollm2-135m-instruct
    python benchmarks/kivi_quality.py --model gemma3-270m --configs int8,kivi2-g32-r128,kivi4-g32-r128

Teacher-forced comparison against the dense cache (float32, batch = number of prompts):
a prompt of real text (pydoc_data.topics and/or the repo README, tokenized by the model's
own tokenizer) is cut into a prefix of --prefix tokens, prefilled in one call (KIVI's
prefill: its queries see the prompt at full precision, then it is stored quantised), and a
continuation of --cont tokens streamed one token at a time through the cache
(`kvjax.evaluate.stream_program`, the decode path), so every continuation token reads the
quantised prefix and the quantised part of the continuation exactly as generation would.
Per cache: mean next-token KL(dense || cache) over the continuation (nats), top-1
agreement with the dense cache, perplexity of the continuation (the dense cache's is the
baseline), and the KL split into flush steps (the token whose write completes an R-block:
kvjax quantises it before it attends, see the notes) and the other steps.

Configs (comma separated): `dense` (always run), `int8`, `kivi{bits}-g{G}-r{R}`, and
`kivi{bits}-g{G}-r{R}-ktok`: the same cache with KEYS quantised PER TOKEN (groups of G
channels, as values are) instead of per channel; this monkeypatches
kvjax.cache.kivi.quantize_keys/dequantize_keys in this process only (per-token scales of
G-token blocks fit the per-channel arrays exactly when G <= head_dim), to test the paper's
per-channel-vs-per-token claim on model quality, not only on reconstruction error.
R must be a multiple of G (kvjax refuses R = 0: the smallest residual is one group).

--analyse: from the prefilled prefix (KIVI prefill attends at full precision, so every
layer's pre-quantisation K/V equals the dense cache's up to float rounding), per layer:
relative MSE (sum err^2 / sum x^2, quantised positions only) of the keys and values read
back through kvjax's own `kivi.read`, a NumPy per-token-key alternative, int8's, the best
uniform clipping of the 2-bit range, and the key channels' range spread (outlier channels:
max / median over channels of each channel's max - min over the prefix).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvjax  # noqa: E402
from kvjax.cache import kivi, layer_arrays  # noqa: E402
from kvjax.evaluate import stream_program  # noqa: E402

DEFAULT_CONFIGS = ("int8,kivi2-g32-r128,kivi2-g32-r32,kivi2-g32-r256,kivi2-g64-r128,kivi2-g128-r128,"
                   "kivi4-g32-r128,kivi4-g128-r128,kivi2-g32-r128-ktok")


# ----------------------------------------------------------------------------- text

def texts(which: str) -> list[str]:
    out = []
    if which in ("pydoc", "both"):
        from pydoc_data import topics
        keys = ["class", "assignment", "exceptions", "execmodel", "function", "import",
                "numbers", "datamodel"]
        out.append("\n\n".join(topics.topics[k] for k in keys if k in topics.topics))
    if which in ("readme", "both"):
        out.append((ROOT / "README.md").read_text())
    return out


def prompts(tok, which: str, n: int) -> np.ndarray:
    rows = []
    for t in texts(which):
        ids = tok.encode(t)
        if len(ids) < n:
            raise SystemExit(f"text {which!r} has only {len(ids)} tokens, need {n}")
        rows.append(ids[:n])
    return np.asarray(rows, np.int32)


# ----------------------------------------------------------------------------- per-token keys

_ORIG = (kivi.quantize_keys, kivi.dequantize_keys)


def _qk_per_token(k, bits, group_size, dtype):
    packed, scale, mn = kivi.quantize_values(k, bits, group_size, dtype)   # [.., N, H/G]
    *lead, N, HG = scale.shape
    shape = tuple(lead) + (N // group_size, group_size * HG)              # = [.., N/G, H]
    return packed, scale.reshape(shape), mn.reshape(shape)


def _dk_per_token(packed, scale, mn, bits, group_size):
    *lead, NG, H = scale.shape
    shape = tuple(lead) + (NG * group_size, H // group_size)
    return kivi.dequantize_values(packed, scale.reshape(shape), mn.reshape(shape), bits, group_size)


def per_token_keys(on: bool):
    kivi.quantize_keys, kivi.dequantize_keys = (_qk_per_token, _dk_per_token) if on else _ORIG
    jax.clear_caches()


# ----------------------------------------------------------------------------- runs

def parse(name: str):
    if name in ("dense", "int8"):
        return dict(kind=name), False
    m = re.fullmatch(r"kivi([24])-g(\d+)-r(\d+)(-ktok)?", name)
    if not m:
        raise SystemExit(f"unknown config {name!r} (dense, int8, kivi2-g32-r128[-ktok], ...)")
    return (dict(kind="kivi", bits=int(m[1]), group_size=int(m[2]), residual_length=int(m[3])),
            bool(m[4]))


def run(cfg, params, toks, P, max_len, spec, ktok):
    """(log-probs float32 [B, C, V] of the continuation, cache after the prefill's read as
    numpy per layer (kivi only, for --analyse), seconds)."""
    t0 = time.time()
    B = toks.shape[0]
    per_token_keys(ktok)
    try:
        # dense: every layer max_len slots (no rings on Gemma's windowed layers, same logits),
        # so slot = position for the analysis
        extra = dict(hybrid=False) if spec["kind"] == "dense" else {}
        cache = kvjax.init_cache(cfg, B, max_len, **spec, **extra)
        first, cache = kvjax.prefill(cfg, params, toks[:, :P], np.full(B, P), cache)
        snap = None
        if spec["kind"] == "kivi":
            snap = [tuple(np.asarray(a) for a in kivi.read(layer_arrays(cache, l), cache.lengths,
                                                           jnp.float32, *cache.quant))
                    for l in range(cfg.num_layers)]
        elif spec["kind"] == "dense":
            snap = [(np.asarray(cache.keys[l][:, :, :P]), np.asarray(cache.values[l][:, :, :P]))
                    for l in range(cfg.num_layers)]
        # The continuation: token P-1's logits came from the prefill; tokens P .. P+C-2 are
        # streamed; logits[:, j] predicts token P + j.
        logits, cache = stream_program(cfg, params, jnp.asarray(toks[:, P:-1]), cache)
        logits = jnp.concatenate([first[:, None], logits], axis=1)
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    finally:
        per_token_keys(False)
    return logp, snap, time.time() - t0


def kivi_positions(snap_layer, P):
    """kivi.read's (k, v, pos, valid) -> dequantised k, v [B, K, P, H] ordered by position,
    and the quantised-position mask [P] (positions < Q)."""
    k, v, pos, valid = snap_layer
    B = k.shape[0]
    ko = np.zeros(k.shape[:2] + (P, k.shape[3]), np.float32)
    vo = np.zeros_like(ko)
    for b in range(B):
        idx = np.flatnonzero(valid[b])
        p = pos[b, idx]
        ko[b][:, p] = k[b][:, idx]
        vo[b][:, p] = v[b][:, idx]
    return ko, vo


# ----------------------------------------------------------------------------- NumPy quantisers

def fake_minmax(x, axis, bits, clip=1.0):
    """Asymmetric min/max quantise-dequantise over `axis`; clip < 1 shrinks the range about
    its centre by that factor (values outside are clipped to the end codes)."""
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    if clip < 1:
        c, h = (lo + hi) / 2, (hi - lo) / 2 * clip
        lo, hi = c - h, c + h
    levels = (1 << bits) - 1
    s = (hi - lo) / levels
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((x - lo) / safe), 0, levels)
    return q * s + lo


def keys_per_channel(k, bits, G, clip=1.0):          # k [..., N, H], N % G == 0
    *lead, N, H = k.shape
    g = k.reshape(tuple(lead) + (N // G, G, H))
    return fake_minmax(g, -2, bits, clip).reshape(k.shape)


def per_token(x, bits, G, clip=1.0):                 # groups of C = min(G, H) channels
    H = x.shape[-1]
    C = min(G, H)
    g = x.reshape(x.shape[:-1] + (H // C, C))
    return fake_minmax(g, -1, bits, clip).reshape(x.shape)


def int8_absmax(x):                                  # kvjax int8: absmax per (token, head)
    s = np.abs(x).max(-1, keepdims=True) / 127
    return np.rint(x / np.where(s > 0, s, 1)) * s


def rel(err_x, x):
    return float(((err_x - x) ** 2).sum() / (x ** 2).sum())


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--text", default="pydoc", choices=["pydoc", "readme", "both"],
                    help="one prompt per text (both: batch 2)")
    ap.add_argument("--prefix", type=int, default=1000, help="tokens prefilled in one call")
    ap.add_argument("--cont", type=int, default=256, help="continuation tokens streamed")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--analyse", default="kivi2-g32-r128",
                    help="the kivi config whose prefilled cache is analysed ('' for none)")
    args = ap.parse_args(argv)

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    t_all = time.time()
    cfg, params, tok = kvjax.load_model(args.model)
    P, C = args.prefix, args.cont
    toks = prompts(tok, args.text, P + C)
    names = [c for c in args.configs.split(",") if c and c != "dense"]
    specs = {n: parse(n) for n in names}
    if args.analyse and args.analyse not in specs:
        specs[args.analyse] = parse(args.analyse)
        names.append(args.analyse)
    Rmax = max([s["residual_length"] for s, _ in specs.values() if s["kind"] == "kivi"] + [128])
    max_len = -(-(P + C) // Rmax) * Rmax
    print(f"model {args.model}: layers {cfg.num_layers}, kv heads {cfg.num_kv_heads}, "
          f"head_dim {cfg.head_dim}; text {args.text}, batch {toks.shape[0]}, prefix {P}, "
          f"continuation {C}, max_len {max_len}")

    dense_lp, dense_snap, t = run(cfg, params, toks, P, max_len, dict(kind="dense"), False)
    nxt = toks[:, P:]                                             # targets [B, C]
    dense_nll = -np.take_along_axis(dense_lp, nxt[..., None], -1)[..., 0]
    dense_top = dense_lp.argmax(-1)
    pd = np.exp(dense_lp)
    print(f"dense: ppl {np.exp(dense_nll.mean()):.3f} ({t:.0f} s)", flush=True)

    rows = [("dense", 0.0, 0.0, 0.0, 1.0, float(np.exp(dense_nll.mean())), t)]
    snaps = {}
    pos = P + np.arange(C)                    # position of the token read at continuation step j
    for n in names:
        spec, ktok = specs[n]
        lp, snap, t = run(cfg, params, toks, P, max_len, spec, ktok)
        if n == args.analyse:
            snaps[n] = snap
        kl = (pd * (dense_lp - lp)).sum(-1)                        # [B, C]
        nll = -np.take_along_axis(lp, nxt[..., None], -1)[..., 0]
        agree = (lp.argmax(-1) == dense_top).mean()
        # Step j reads the token at position P - 1 + j (j = 0: the prefill's last token);
        # it is a flush step when its write completes an R-block.
        if spec["kind"] == "kivi":
            R = spec["residual_length"]
            flush = (pos % R == 0) & (np.arange(C) > 0)
            kf, kn = kl[:, flush].mean(), kl[:, ~flush].mean()
        else:
            kf = kn = float("nan")
        rows.append((n, kl.mean(), kf, kn, agree, float(np.exp(nll.mean())), t))
        print(f"{n}: KL {kl.mean():.4f} (flush {kf:.4f}, other {kn:.4f}), top-1 {agree:.3f}, "
              f"ppl {np.exp(nll.mean()):.3f} ({t:.0f} s)", flush=True)

    print("\n| cache | KL(dense‖cache) nats | KL flush steps | KL other steps | top-1 agree | ppl | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, kl, kf, kn, ag, ppl, t in rows:
        print(f"| {n} | {kl:.4f} | {kf:.4f} | {kn:.4f} | {ag:.3f} | {ppl:.3f} | {t:.0f} |")

    if args.analyse and args.analyse in snaps:
        analyse(cfg, args.analyse, specs[args.analyse][0], snaps[args.analyse], dense_snap, P)
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"total {time.time() - t_all:.0f} s")


def analyse(cfg, name, spec, snap, dense_snap, P):
    bits, G, R = spec["bits"], spec["group_size"], spec["residual_length"]
    Q = (P // R) * R
    print(f"\nPer-layer reconstruction of the prefilled prefix ({name}, positions [0, {Q}) "
          f"quantised): relative MSE = sum err^2 / sum x^2")
    print("| layer | K kvjax (per-channel) | K per-token (NumPy) | K best clip | "
          "V kvjax (per-token) | V best clip | K int8 | V int8 | K ch. range max/median | "
          "V ch. range max/median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    tot = {}
    clips = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
    for l in range(cfg.num_layers):
        kq, vq = kivi_positions(snap[l], P)
        kd, vd = dense_snap[l]
        kd, vd, kq, vq = (a[:, :, :Q].astype(np.float32) for a in (kd, vd, kq, vq))
        rk, rv = rel(kq, kd), rel(vq, vd)
        rk_np = rel(keys_per_channel(kd, bits, G), kd)
        rv_np = rel(per_token(vd, bits, G), vd)
        rk_tok = rel(per_token(kd, bits, G), kd)
        rk_clip = min(rel(keys_per_channel(kd, bits, G, c), kd) for c in clips)
        rv_clip = min(rel(per_token(vd, bits, G, c), vd) for c in clips)
        rk8, rv8 = rel(int8_absmax(kd), kd), rel(int8_absmax(vd), vd)
        krange = kd.max(2) - kd.min(2)                 # [B, K, H]
        vrange = vd.max(2) - vd.min(2)
        kspread = float((krange.max(-1) / np.median(krange, -1)).max())
        vspread = float((vrange.max(-1) / np.median(vrange, -1)).max())
        for key, val in (("k", rk), ("k_np", rk_np), ("v_np", rv_np), ("ktok", rk_tok), ("kclip", rk_clip),
                         ("v", rv), ("vclip", rv_clip), ("k8", rk8), ("v8", rv8),
                         ("ks", kspread), ("vs", vspread)):
            tot.setdefault(key, []).append(val)
        print(f"| {l} | {rk:.4f} | {rk_tok:.4f} | {rk_clip:.4f} | {rv:.4f} | {rv_clip:.4f} | "
              f"{rk8:.2e} | {rv8:.2e} | {kspread:.1f} | {vspread:.1f} |")
    m = {k: float(np.mean(v)) for k, v in tot.items()}
    print(f"| mean | {m['k']:.4f} | {m['ktok']:.4f} | {m['kclip']:.4f} | {m['v']:.4f} | "
          f"{m['vclip']:.4f} | {m['k8']:.2e} | {m['v8']:.2e} | {m['ks']:.1f} | {m['vs']:.1f} |")
    dk = max(abs(a - b) for a, b in zip(tot["k"], tot["k_np"]))
    dv = max(abs(a - b) for a, b in zip(tot["v"], tot["v_np"]))
    print(f"kvjax vs the NumPy quantisers (keys per channel, values per token): largest "
          f"per-layer rel-MSE difference {dk:.2e} (keys), {dv:.2e} (values)")


if __name__ == "__main__":
    main()
