"""`kvjax run experiments/long_press_benchmark.yaml` end to end at CI size: the bundled text
model with its rotary positions allowed to 1,024 (a copy of its folder, config edited), two
samples of the RULER needle task at 256 tokens, three presses at one ratio, the baselines,
and DecodingPress(Knorm) (compacting every 2 generated tokens) on the same task.

What would be wrong if the kind were broken: a method missing from the rows; the query-aware
protocol not reading the question's last token through the cache (dense would then differ between the
protocols: with every token kept, both must give the same answer log-likelihood); bytes
that do not order as the caches do (a press at ratio 0.5 and a window ring of half the
context below dense, int8 and KIVI-2 below half of dense); a missing leaderboard plot.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kvjax.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments" / "long_press_benchmark.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = tmp_path_factory.mktemp("model") / "text1k"
    shutil.copytree(ROOT / "kvjax" / "assets" / "models" / "text", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path_factory.mktemp("lpb") / "run"
    sets = [f"long_press_benchmark.models=[{model}]", "long_press_benchmark.lengths=[256]",
            "long_press_benchmark.tasks=[niah_single]", "long_press_benchmark.samples=2",
            "long_press_benchmark.presses=[SnapKV,Knorm,AdaKV(ExpectedAttention)]", "long_press_benchmark.ratios=[0.5]",
            "long_press_benchmark.baselines=[dense,int8,kivi2,window]", "long_press_benchmark.max_new_tokens=6",
            "long_press_benchmark.window_size=16", "long_press_benchmark.n_future_positions=32",
            "long_press_benchmark.kivi_group_size=16", "long_press_benchmark.kivi_residual_length=32",
            "long_press_benchmark.time_budget_s=0", "device=cpu",
            "long_press_benchmark.stack_bytes=1e9", "long_press_benchmark.ring_lengths=[]",
            "long_press_benchmark.decoding_presses=[Knorm]",
            "long_press_benchmark.decoding_tasks=[niah_single]", "long_press_benchmark.decoding_interval=2"]
    assert main(["run", str(EXP), "--out", str(out), *[x for s in sets for x in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rows if "method" in r]


def test_every_method_task_and_protocol_has_a_row(run):
    _, rows = run
    got = {(r["task"], r["protocol"], r["method"], r["ratio"]) for r in rows}
    for task in ("niah_single",):
        for m, ratio in (("dense", None), ("SnapKV", 0.5), ("Knorm", 0.5), ("AdaKV(ExpectedAttention)", 0.5)):
            assert (task, "agnostic", m, ratio) in got and (task, "aware", m, ratio) in got
        for m, ratio in (("int8", None), ("kivi2", None), ("window", 0.5)):
            assert (task, "agnostic", m, ratio) in got       # baselines do not look at the query
    for m, ratio in (("dense", None), ("DecodingPress(Knorm)", 0.5)):
        assert ("niah_single", "decoding", m, ratio) in got
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["answer_loglik"]) and r["answer_loglik"] < 0
        assert r["samples"] == 2
        # SnapKV and Knorm (per-head, ratio 0.5) are scored as one stacked batch; AdaKV pools
        assert r["stacked"] == (2 if r["method"] in ("SnapKV", "Knorm") else 1) or r["protocol"] == "decoding"
        if r["protocol"] == "decoding":
            assert r["stacked"] == 1 and 0.0 <= r["token_accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
            assert 0.0 <= r["copied"] <= 1.0
            if r["method"] == "dense":                    # dense is the reference of agreement
                assert r["agreement"] == 1.0 and r["bytes_vs_dense"] == 1.0
            else:                                         # half the context kept, compacting every 2 tokens
                assert r["target_size"] == round(0.5 * r["context_tokens"]) and r["interval"] == 2
                assert r["bytes_vs_dense"] < 0.6
            continue
        if r["protocol"] == "agnostic":                   # aware rows hold context + question
            assert 240 <= r["context_tokens"] <= 256


def test_dense_is_the_same_in_both_protocols(run):
    """Every token kept: compressing context + question but its last token, then reading that
    token through the cache must score the answer exactly as feeding the question after the context."""
    _, rows = run
    for task in ("niah_single",):
        a, b = (next(r for r in rows if r["task"] == task and r["method"] == "dense" and r["protocol"] == p)
                for p in ("agnostic", "aware"))
        assert a["answer_loglik"] == pytest.approx(b["answer_loglik"], rel=1e-4, abs=1e-4)
        assert a["accuracy"] == b["accuracy"]


def test_bytes_order_as_the_caches_do(run):
    _, rows = run
    by = {(r["method"], r["protocol"]): r["bytes_vs_dense"] for r in rows if r["task"] == "niah_single"}
    assert by[("dense", "agnostic")] == 1.0
    assert by[("SnapKV", "agnostic")] < 0.6 and by[("window", "agnostic")] < 0.6
    assert by[("kivi2", "agnostic")] < 0.5 and by[("int8", "agnostic")] < 0.5   # (float32 dense)
    assert by[("AdaKV(ExpectedAttention)", "agnostic")] < 0.6


def test_results_folder(run):
    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] > 0 and summary["skipped"] == []
    pngs = sorted(p.name for p in out.glob("leaderboard_*.png"))
    assert len(pngs) == 3 and all(n.endswith(("_agnostic.png", "_aware.png", "_decoding.png")) for n in pngs)
    md = (out / "summary.md").read_text()
    assert "Best method per ratio" in md and "DecodingPress on a long generation" in md
