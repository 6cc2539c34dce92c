"""`kvjax run experiments/press_benchmark.yaml` end to end at tiny size, on the bundled models.

The values checked would be wrong if the kind were broken: the dense cache recalls (the
recall model gets ~1.0), a ring recalls what it holds and guesses beyond, SnapKV recalls far
better when the query is inside its scoring window than when it comes after compression, a
pressed cache's bytes are below dense and equal to `kvjax.cache_bytes(..., pressed=True)` /
`kvjax.press.cache_bytes`, and DecodingPress memory is the same at every point of a long
generation while a dense cache's would grow.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax import press as P
from kvjax.bundled import bundled_config
from kvjax.cli import main
from kvjax.runner import is_complete

EXP = Path(__file__).resolve().parents[1] / "experiments" / "press_benchmark.yaml"

TINY = ["device=cpu",
        "press_benchmark.presses=[Knorm,SnapKV]",
        "press_benchmark.baselines=[dense,window]",
        "press_benchmark.ratios=[0.5]", "press_benchmark.timing_ratios=[0.5]",
        "press_benchmark.recall_rows=1",                         # 32 recall sequences, one per distance
        "press_benchmark.seq_len=48", "press_benchmark.ppl_prefix=24", "press_benchmark.ppl_windows=2",
        "press_benchmark.repeats=2", "press_benchmark.min_seconds=0.01",
        "press_benchmark.decoding_prompt=8", "press_benchmark.decoding_calls=3",
        "press_benchmark.decoding_tokens_per_call=31", "press_benchmark.decoding_interval=16",
        "press_benchmark.decoding_target=16"]


def set_args(overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pb") / "run"
    assert main(["run", str(EXP), "--out", str(out), *set_args(TINY)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_folder_plots_and_every_row(tiny_run):
    out, rows = tiny_run
    assert is_complete(out) and not (out / "FAILED").exists()
    for png in ("press_benchmark.png", "decoding_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["errors"] == 0 and summary["bytes_exact"] is True
    methods = {(r["method"], r["ratio"]) for r in rows if "method" in r}
    assert {m for m, _ in methods} == {"dense", "Knorm", "SnapKV", "window"}
    assert ("Knorm", 0.5) in methods and ("SnapKV", 0.5) in methods and ("window", 0.5) in methods
    for r in rows:
        if "method" in r:
            assert "errors" not in r, r
            for key in ("recall_agnostic", "recall_aware", "ppl", "recall_bytes_per_token",
                        "text_bytes_per_token", "prefill_ms", "decode_ms"):
                assert r[key] is not None and r[key] > 0, (r["method"], key)
    assert "| method |" in (out / "summary.md").read_text()


def test_recall_values(tiny_run):
    _, rows = tiny_run
    by = {r["method"]: r for r in rows if "method" in r}
    assert by["dense"]["recall_agnostic"] >= 0.9 and by["dense"]["recall_aware"] >= 0.9
    # SnapKV's window holds the query only in the query-aware protocol: it finds the pair there
    assert by["SnapKV"]["recall_aware"] >= 0.8 > 0.7 >= by["SnapKV"]["recall_agnostic"]
    # a ring of half the context recalls what it holds, and guesses (chance 0.1) for pairs far back
    w = by["window"]
    near = [a for a, d in zip(w["recall_agnostic_by_distance"], range(4, 98, 3)) if d <= 31]
    far = [a for a, d in zip(w["recall_agnostic_by_distance"], range(4, 98, 3)) if d >= 67]
    assert np.mean(near) >= 0.9 and np.mean(far) <= 0.4


def test_pressed_bytes_are_smaller_and_exactly_predicted(tiny_run):
    _, rows = tiny_run
    by = {r["method"]: r for r in rows if "method" in r}
    dense = by["dense"]
    for name, model in (("recall", bundled_config("recall")), ("text", bundled_config("text"))):
        for m in ("Knorm", "SnapKV"):
            r = by[m]
            slots, B, n = r[f"{name}_slots"], r[f"{name}_batch"], r[f"{name}_context"]
            assert len(set(slots)) == 1 and slots[0] == int(n * 0.5)          # n_kept = int(n * (1 - 0.5))
            measured = r[f"{name}_cache_bytes"]
            assert measured == kvjax.cache_bytes(model, B, slots[0], pressed=True)
            assert measured == P.cache_bytes(model, B, slots) == r[f"{name}_cache_bytes_predicted"]
            assert r[f"{name}_bytes_per_token"] == pytest.approx(measured / (B * n))
            # half the tokens, plus an int32 position per slot and head: well under dense, above half
            ratio = r[f"{name}_bytes_per_token"] / dense[f"{name}_bytes_per_token"]
            assert 0.45 < ratio < 0.6
        assert dense[f"{name}_cache_bytes"] == kvjax.cache_bytes(model, dense[f"{name}_batch"],
                                                                 dense[f"{name}_context"])


def test_decoding_press_memory_is_flat(tiny_run):
    _, rows = tiny_run
    pts = [r for r in rows if r.get("decoding_press")]
    assert [p["call"] for p in pts] == [1, 2, 3]
    text = bundled_config("text")
    flat = kvjax.cache_bytes(text, 1, 16 + 16, pressed=True)
    assert all(p["cache_bytes"] == flat for p in pts)
    assert all(p["fill_max"] <= 32 for p in pts) and pts[-1]["generated"] == 93
    dense = [p["dense_bytes"] for p in pts]
    assert dense == sorted(dense) and dense[-1] > flat
    assert dense[-1] == kvjax.cache_bytes(text, 1, pts[-1]["tokens"])


def test_bad_press_name_is_a_config_error(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["run", str(EXP), "--out", str(out), "--set", "press_benchmark.presses=[SnapKV,AdaKV(Foo)]"]) == 2
    err = capsys.readouterr().err
    assert "press_benchmark.presses[1]" in err and "unknown inner press 'Foo'" in err
    assert not out.exists()


@pytest.mark.parametrize("make", [lambda: P.KnormPress(0.0), lambda: P.AdaKVPress(P.KnormPress(0.0)),
                                  lambda: P.KeyRerotationPress(P.StreamingLLMPress(0.0))],
                         ids=["per-head", "pooled", "rerotated"])
def test_query_aware_protocol_keeping_everything_equals_dense(make):
    """Query-aware recall presses context + query, drops the query's last token from the cache
    and reads it again: with nothing dropped by the press, that is exactly the dense logits."""
    from kvjax import data
    from kvjax.runner.kinds import press_benchmark as pb

    cfg, params, folder = pb._load("recall")
    task = pb._recall_task(folder)
    batch = data.recall_batch(task, np.random.default_rng(1), 4, distance=np.array([4, 31, 64, 97]))
    prompts, _ = data.recall_prompts(batch)
    B, W = prompts.shape
    p = make()
    _, cache = kvjax.prefill(cfg, params, prompts, np.full(B, W), pb._run_cache(cfg, B, W + 3, p), press=p)
    cache = pb._drop_newest(cache)
    assert (np.asarray(cache.lengths) == W - 1).all()
    last = np.zeros((B, 2), np.int32)
    last[:, 0] = prompts[:, -1]
    logits, _ = kvjax.prefill(cfg, params, last, np.ones(B, np.int32), cache)
    ref = np.asarray(kvjax.forward(cfg, params, prompts))[:, -1]
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4)
