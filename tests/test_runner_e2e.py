"""`kvjax run` end to end on tiny sizes: every results file, and no false completion.

Each kind runs once with `--set` overrides that shrink it to a few compiles, through the
same `kvjax.cli.main` the command uses. A run that raises midway (or is interrupted)
must leave a folder without COMPLETE and without a final metrics.jsonl.
"""
import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

import kvjax
import kvjax.runner.kinds.memory_scaling as memory_scaling
from kvjax.cli import main
from kvjax.runner import is_complete, load_config

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"

PNG = b"\x89PNG\r\n\x1a\n"
FILES = ["config.yaml", "env.json", "metrics.jsonl", "metrics.csv", "summary.md", "summary.json",
         "COMPLETE"]

# Tiny overrides per committed config: a few compiles each, same code paths. The
# shapes line up on purpose (batch 1, prompt 5, 4 new tokens, an 8-slot cache for the
# timed steps, the plain llama-tiny config) so later runs in this process reuse earlier
# compiles.
TINY = {
    "quickstart.yaml": ["quickstart.max_new_tokens=4", "quickstart.repeats=2", "quickstart.min_seconds=0.01",
                        "quickstart.prompts=[abcd]"],  # <bos> + 4 bytes = 5 tokens
    "cache_vs_nocache.yaml": ["cache_vs_nocache.seq_lens=[8]", "cache_vs_nocache.step_repeats=2",
                              "cache_vs_nocache.generate_lens=[9]", "cache_vs_nocache.prompt_len=5",
                              "cache_vs_nocache.gen_repeats=2", "cache_vs_nocache.model={}",
                              "cache_vs_nocache.min_seconds=0.01"],
    "memory_scaling.yaml": ["memory_scaling.preset=llama-tiny", "memory_scaling.kv_heads=[4,2,1]",
                            "memory_scaling.context_lens=[16,32]", "memory_scaling.batch_sizes=[1,2]",
                            "memory_scaling.base_context=16", "memory_scaling.budget_gib=0.001",
                            "memory_scaling.hybrid_presets=[gemma3-tiny]", "memory_scaling.hybrid_contexts=[8,64]"],
    "batch_throughput.yaml": ["batch_throughput.batch_sizes=[1]", "batch_throughput.prompt_len=5",
                              "batch_throughput.new_tokens=4", "batch_throughput.step_repeats=2",
                              "batch_throughput.gen_repeats=2", "batch_throughput.min_seconds=0.01"],
}


def run_cli(*argv) -> int:
    return main(["run", *map(str, argv)])


def set_args(overrides):
    return [x for o in overrides for x in ("--set", o)]


def check_folder(path: Path, plot: str):
    for name in FILES + [plot]:
        assert (path / name).is_file(), f"{name} missing from {sorted(p.name for p in path.iterdir())}"
    assert is_complete(path)
    assert not list(path.glob("*.tmp")) and not (path / "metrics.jsonl.partial").exists()
    assert not (path / "FAILED").exists()
    assert (path / plot).read_bytes()[:8] == PNG
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    with open(path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert rows and len(table) == len(rows)
    env = json.loads((path / "env.json").read_text())
    assert env["versions"]["jax"] and env["backend"] == "cpu" and env["device_count"] >= 1
    assert env["memory_stats"] is None  # CPU reports none: recorded as such, never invented
    summary = json.loads((path / "summary.json").read_text())
    assert summary["wall_s"] > 0
    assert "|" in (path / "summary.md").read_text()  # a markdown table
    # config.yaml is the resolved config and loads back as a valid config
    assert load_config(path / "config.yaml").to_dict() == yaml.safe_load((path / "config.yaml").read_text())
    return rows, summary


@pytest.mark.parametrize("name, plot", [("memory_scaling.yaml", "memory_scaling.png"),
                                        ("cache_vs_nocache.yaml", "cache_vs_nocache.png"),
                                        ("batch_throughput.yaml", "batch_throughput.png")])
def test_each_kind_writes_every_results_file(tmp_path, name, plot):
    out = tmp_path / "run"
    assert run_cli(EXP / name, "--out", out, "--set", "device=cpu", *set_args(TINY[name])) == 0
    rows, summary = check_folder(out, plot)
    if name == "memory_scaling.yaml":
        allocated = [r for r in rows if r.get("allocated_bytes") is not None]
        assert allocated and all(r["allocated_bytes"] == r["predicted_bytes"] for r in allocated)
        assert all(r["device_stats"] == "unavailable" for r in allocated)
        assert summary["ok"] is True
        hybrid = {r["context_len"]: r for r in rows if r["sweep"] == "hybrid"}
        assert hybrid[8]["full_over_hybrid"] == 1.0                 # no window shorter than 8 slots
        assert hybrid[64]["full_over_hybrid"] > 2 and hybrid[64]["match"] is True
    if name == "cache_vs_nocache.yaml":
        step = next(r for r in rows if r["sweep"] == "per_token")
        assert step["scores_cached_needed"] == 8 and step["scores_nocache_needed"] == 36
        gen = next(r for r in rows if r["sweep"] == "generate")
        # prompt 5, then tokens at context lengths 6..9: cached 15 + (6+...+9) (prefill's
        # causal pairs, one row per decoded token); no cache re-forms each prefix's triangle
        assert gen["scores_cached_needed"] == 15 + 6 + 7 + 8 + 9
        assert gen["scores_nocache_needed"] == 15 + 21 + 28 + 36
        assert gen["tokens_match"] is True and summary["ok"] is True
        _check_timing(step, "cached") and _check_timing(step, "nocache")
        assert step["ratio"] == pytest.approx(step["nocache_ms"] / step["cached_ms"]) or not step["valid"]
    if name == "batch_throughput.yaml":
        (row,) = rows
        _check_timing(row, "step")
        _check_timing(row, "generate", unit="s")
        assert row["step_tok_s"] == pytest.approx(1e3 / row["step_ms"])          # batch 1
        assert row["generate_tok_s"] == pytest.approx(4 / row["generate_s"])     # 4 new tokens
        cfg = kvjax.ModelConfig.preset("llama-tiny")
        assert row["live_cache_bytes"] == kvjax.cache_bytes(cfg, 1, 5 + 2) - 4   # prompt + mean of 4 steps
        assert summary["invalid_rows"] == sum(not r["valid"] for r in rows)


def _check_timing(row, prefix, unit="ms"):
    """A timing's figures are consistent: min <= median, spread >= 0, calibrated calls, no
    compilation inside the timed region (a kind that recompiled per call would show here)."""
    assert 0 < row[f"{prefix}_min_{unit}"] <= row[f"{prefix}_{unit}"]
    assert row[f"{prefix}_spread_{unit}"] >= 0 and row[f"{prefix}_calls"] >= 1
    assert row[f"{prefix}_repeats"] == 2
    assert row[f"{prefix}_valid"] == (row[f"{prefix}_spread_{unit}"] <= row[f"{prefix}_{unit}"])
    return True


def test_cache_vs_nocache_fails_when_the_paths_disagree(tmp_path, monkeypatch, capsys):
    """A wrong no-cache path (tokens shifted) must fail the run, not become a note."""
    import kvjax.runner.kinds.cache_vs_nocache as kind

    real = kvjax.generate

    def broken(*a, use_cache=True, **k):
        out = real(*a, use_cache=use_cache, **k)
        return out if use_cache else out._replace(tokens=(out.tokens + 1) % 256)

    monkeypatch.setattr(kind.kvjax, "generate", broken)
    out = tmp_path / "run"
    assert run_cli(EXP / "cache_vs_nocache.yaml", "--out", out, *set_args(TINY["cache_vs_nocache.yaml"])) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["tokens_match"] is False
    assert "CHECK FAILED" in (out / "summary.md").read_text()


def test_quickstart_checks_tokens_identical(tmp_path):
    """The same code path as the bundled quickstart, on random weights of a preset."""
    out = tmp_path / "qs"
    args = ["--set", "quickstart.source=preset", "--set", "quickstart.model=llama-tiny"]
    assert run_cli(EXP / "quickstart.yaml", "--out", out, *args, *set_args(TINY["quickstart.yaml"])) == 0
    rows, summary = check_folder(out, "quickstart.png")
    assert summary["tokens_identical"] is True and summary["ok"] is True
    assert summary["kv_cache_bytes"] == summary["kv_cache_bytes_predicted"]
    assert {r["path"] for r in rows if "path" in r} == {"with cache", "without cache"}


def test_default_folder_is_out_dir_name_timestamp(tmp_path):
    args = set_args(TINY["memory_scaling.yaml"] + ["memory_scaling.allocate=false", f"out_dir={tmp_path}"])
    assert run_cli(EXP / "memory_scaling.yaml", *args) == 0
    assert run_cli(EXP / "memory_scaling.yaml", *args) == 0  # same second: a fresh folder, never shared
    runs = sorted((tmp_path / "memory_scaling").iterdir())
    assert len(runs) == 2 and all(is_complete(p) for p in runs)


def test_out_must_be_new_or_empty(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "x").write_text("old")
    assert run_cli(EXP / "memory_scaling.yaml", "--out", out) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_run_that_raises_midway_is_not_marked_complete(tmp_path, monkeypatch):
    def failing_run(ctx, cfg):
        ctx.log({"step": 1, "value": 0.5})  # some metrics are already out
        raise RuntimeError("boom midway")

    monkeypatch.setattr(memory_scaling, "run", failing_run)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="boom midway"):
        run_cli(EXP / "memory_scaling.yaml", "--out", out)
    assert out.is_dir() and not is_complete(out)
    assert not (out / "COMPLETE").exists() and not (out / "metrics.jsonl").exists()
    assert "boom midway" in (out / "FAILED").read_text()
    # the partial metrics stay inspectable under their unfinished name
    assert json.loads((out / "metrics.jsonl.partial").read_text())["value"] == 0.5


def test_interrupted_run_is_not_marked_complete(tmp_path, monkeypatch, capsys):
    def interrupted(ctx, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(memory_scaling, "run", interrupted)
    out = tmp_path / "cut"
    assert run_cli(EXP / "memory_scaling.yaml", "--out", out) == 130
    assert not is_complete(out) and (out / "FAILED").exists()
    assert "interrupted" in capsys.readouterr().err


def test_killed_process_leaves_no_complete_marker(tmp_path):
    """A hard kill (no exception handler runs) mid-run: still no COMPLETE."""
    import subprocess

    out = tmp_path / "killed"
    code = (
        "import os, sys\n"
        "import kvjax.runner.kinds.memory_scaling as m\n"
        "def run(ctx, cfg):\n"
        "    ctx.log({'step': 1})\n"
        "    os._exit(9)\n"
        "m.run = run\n"
        "from kvjax.cli import main\n"
        f"sys.exit(main(['run', {str(EXP / 'memory_scaling.yaml')!r}, '--out', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert out.is_dir() and (out / "config.yaml").is_file() and not is_complete(out)
    assert not (out / "metrics.jsonl").exists()


def test_train_kind_streams_metrics(tmp_path, capsys):
    cfg = {"name": "tiny-train", "kind": "train",
           "train": {"d_model": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64,
                     "seq_len": 16, "num_steps": 2, "warmup_steps": 1, "batch_size": 2,
                     "log_every": 1, "eval_every": 2, "eval_windows": 1, "checkpoint_every": 100}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "t"
    assert main(["train", str(path), "--out", str(out)]) == 0  # `kvjax train` = run, kind train
    rows, summary = check_folder(out, "train_loss.png")
    assert [r["step"] for r in rows] == [1, 2] and "eval_loss" in rows[-1]
    assert "eval_loss" not in rows[0] and summary["steps"] == 2
    capsys.readouterr()
    assert main(["train", str(EXP / "quickstart.yaml"), "--out", str(tmp_path / "q")]) == 2
    assert "kind 'quickstart' is not 'train'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_compression_quality_recall_fails_exactly_beyond_the_window(tmp_path):
    """On the bundled models: every kind writes its rows; the recall model answers pairs
    inside a 32-slot ring and guesses (chance ~0.1) for pairs farther back."""
    out = tmp_path / "cq"
    tiny = ["compression_quality.windows=[32]", "compression_quality.int8=false",
            "compression_quality.seq_len=32", "compression_quality.ppl_windows=2",
            "compression_quality.recall_rows=4", "compression_quality.stream_len=64",
            "compression_quality.stream_rows=1", "compression_quality.stream_block=16"]
    assert run_cli(EXP / "compression_quality.yaml", "--out", out, "--set", "device=cpu",
                   *set_args(tiny)) == 0
    rows, _ = check_folder(out, "compression_quality.png")
    assert {r["cache"] for r in rows if "ppl" in r} == {"dense", "window 32", "sinks 4+32"}
    recall = [r for r in rows if r.get("model") == "recall"]

    def mean(cache, inside):
        accs = [r["accuracy"] for r in recall if r["cache"] == cache and (r["distance"] < 32) == inside]
        assert accs
        return sum(accs) / len(accs)

    assert mean("dense", True) >= 0.9 and mean("dense", False) >= 0.9
    for ring in ("window 32", "sinks 4+32"):
        assert mean(ring, True) >= 0.9 and mean(ring, False) <= 0.4
