"""decode_bench and sharded_decode run end to end at tiny size and write complete results."""
import json
from pathlib import Path


import pytest

import kvjax
from kvjax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, config, *sets):
    out = tmp_path / "run"
    args = ["run", str(ROOT / "experiments" / config), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert (out / "COMPLETE").exists()
    return out, json.loads((out / "summary.json").read_text())


def test_decode_bench_cpu_twin_runs_at_tiny_size(tmp_path):
    out, summary = _run(tmp_path, "decode_bench_cpu.yaml",
                        "decode_bench.model={num_layers: 1, d_model: 64, num_heads: 4, num_kv_heads: 2, "
                        "head_dim: 16, mlp_dim: 128, max_position: 2048}",
                        "decode_bench.batch_sizes=[1, 2]", "decode_bench.contexts=[16, 64]",
                        "decode_bench.new_tokens=4", "decode_bench.repeats=2", "decode_bench.copy_mib=8",
                        "decode_bench.min_seconds=0.01",
                        "decode_bench.short_max_len=64", "decode_bench.long_max_len=1024",
                        "decode_bench.short_live=32", "decode_bench.hf=false")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    grid = [r for r in rows if "mbu" in r]
    assert sorted((r["batch"], r["context"]) for r in grid) == [(1, 16), (1, 64), (2, 16), (2, 64)]
    cfg = kvjax.ModelConfig.preset("llama-tiny").replace(num_layers=1, d_model=64, num_heads=4, num_kv_heads=2,
                                                          head_dim=16, mlp_dim=128, max_position=2048)
    for r in grid:
        assert r["mbu"] is None   # left out on CPU (the model sits in the CPU caches), not invented
        # the bytes of the mean live context over the 4 timed steps: C + 2, exact
        assert r["live_kv_bytes"] == kvjax.cache_bytes(cfg, r["batch"], r["context"] + 2) - 4 * r["batch"]
        assert r["tok_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert 0 < r["step_min_ms"] <= r["step_ms"] and r["step_repeats"] == 2 and r["step_calls"] >= 1
        assert r["step_valid"] == (r["step_spread_ms"] <= r["step_ms"])
        assert r["valid"] == (r["step_valid"] and r["prefill_valid"])
        assert r["step_compiles"] >= 0 and "hf_default_ms" not in r
    check = next(r for r in rows if r.get("length_check"))
    assert check["short_step_repeats"] == check["long_step_repeats"] == 2
    assert summary["invalid_rows"] == sum(not r["valid"] for r in grid)
    assert summary["bandwidth_gb_s"] > 0
    if check["valid"]:
        assert summary["llama-tiny_long_vs_short"] == pytest.approx(check["long_step_ms"] / check["short_step_ms"])
    assert (out / "decode_bench.png").stat().st_size > 1000


def test_decode_bench_rejects_a_length_check_that_does_not_fit(tmp_path):
    assert main(["run", str(ROOT / "experiments" / "decode_bench_cpu.yaml"), "--out", str(tmp_path / "x"),
                 "--set", "decode_bench.short_live=500"]) == 2
    assert not (tmp_path / "x").exists()


def test_sharded_decode_without_a_mesh_runs_on_one_device(tmp_path):
    out, summary = _run(tmp_path, "sharded_decode.yaml", "mesh={}", "sharded_decode.new_tokens=4",
                        "sharded_decode.repeats=1", "sharded_decode.min_seconds=0.01")
    assert summary["one_device_tok_s"] > 0 and "tokens_identical" not in summary
    config = (out / "config.yaml").read_text()
    assert "mesh: {}" in config
