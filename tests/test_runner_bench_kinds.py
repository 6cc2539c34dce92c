"""decode_bench and sharded_decode run end to end at tiny size and write complete results."""
import json
from pathlib import Path


import jax
import pytest

import kvjax
from kvjax.cli import main

from conftest import require_module

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
        assert r["mbu"] is None and r["mbu_read"] is None   # left out on CPU (the model sits
        # in the CPU caches), not invented; the bytes of the mean live context over the 4 timed steps: C + 2, exact
        assert r["live_kv_bytes"] == kvjax.cache_bytes(cfg, r["batch"], r["context"] + 2) - 4 * r["batch"]
        assert r["tok_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert 0 < r["step_min_ms"] <= r["step_ms"] and r["step_repeats"] == 2 and r["step_calls"] >= 1
        assert r["step_valid"] == (r["step_spread_ms"] <= r["step_ms"])
        assert r["valid"] == (r["step_valid"] and r["prefill_valid"])
        assert r["step_compiles"] >= 0 and "hf_default_ms" not in r
    check = next(r for r in rows if r.get("length_check"))
    assert check["short_step_repeats"] == check["long_step_repeats"] == 2
    assert summary["invalid_rows"] == sum(not r["valid"] for r in grid)
    assert summary["bandwidth_gb_s"] > 0 and summary["read_bandwidth_gb_s"] > 0
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


# --- decode_bench on real checkpoints (`models:`), issue 20 part 7. A random-init tiny llama
# written as a Hugging Face folder stands in for a real model: the same path (load_model, then
# transformers' from_pretrained on the same files), none of the real models' load time.

_TINY = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
             vocab_size=260, max_position=256)   # ByteTokenizer: 256 bytes + specials
_REAL_SETS = ("decode_bench.batch_sizes=[1]", "decode_bench.contexts=[8]", "decode_bench.new_tokens=2",
              "decode_bench.repeats=2", "decode_bench.min_seconds=0.01", "decode_bench.copy_mib=8")


def _tiny_checkpoint(folder):
    from kvjax.hf import save_hf
    from kvjax.tokenizer import ByteTokenizer

    cfg = kvjax.ModelConfig.preset("llama-tiny").replace(**_TINY)
    save_hf(cfg, kvjax.init_params(cfg, jax.random.key(0)), folder, tokenizer=ByteTokenizer())


def test_decode_bench_runs_a_checkpoint_by_name_with_transformers_on_the_same_files(tmp_path):
    require_module("torch", "transformers' decode loop is the baseline")
    require_module("transformers", "it loads the same checkpoint folder")
    _tiny_checkpoint(tmp_path / "tiny-ckpt")
    out, summary = _run(tmp_path, "real_model_decode_cpu.yaml", "decode_bench.presets=[]",
                        f"decode_bench.models=[{tmp_path / 'tiny-ckpt'}]", *_REAL_SETS)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["preset"], r["batch"], r["context"]) for r in rows] == [("tiny-ckpt", 1, 8)]
    row = rows[0]
    assert row["mbu"] is None   # a few KB fit in any CPU cache: MBU left out, not invented
    assert row["hf_default_ms"] > 0 and row["hf_static_ms"] > 0 and "speedup_vs_hf_default" in row
    assert not any(r.get("length_check") for r in rows)   # length_check: false in the config
    for key in ("load_average_start", "load_average_end"):
        assert summary[key] is None or len(summary[key]) == 3
    host = json.loads((out / "env.json").read_text())["host"]
    assert "load_average" in host and "last_level_cache_bytes" in host


@pytest.mark.parametrize("sets, key", [
    (("decode_bench.models=[no-such-model]",), "decode_bench.models[0]"),
    (("decode_bench.models=[]",), "decode_bench.presets"),
])
def test_decode_bench_rejects_unknown_or_missing_models_before_loading(tmp_path, capsys, sets, key):
    args = ["run", str(ROOT / "experiments" / "real_model_decode_cpu.yaml"), "--out", str(tmp_path / "x")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_mbu_is_counted_on_cpu_only_past_the_last_level_cache(tmp_path):
    from kvjax.runner.env import last_level_cache_bytes
    from kvjax.runner.kinds.decode_bench import mbu_counted

    assert mbu_counted("gpu", 10, None) and mbu_counted("tpu", 10, 2**30)
    assert mbu_counted("cpu", 538_000_000, 300 * 2**20)
    assert not mbu_counted("cpu", 300 * 2**20, 300 * 2**20) and not mbu_counted("cpu", 10**12, None)
    for name, level, size in (("index0", 1, "48K"), ("index2", 2, "2048K"), ("index3", 3, "300M"),
                              ("index9", 3, "bad")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 300 * 2**20
    assert last_level_cache_bytes(tmp_path / "absent") is None
