"""`kvjax models`: every bundled and packaged name with its shape, from metadata only.

Oracles: the bundled models' own config (bundled_config) and parameter count (their weights,
1.7M parameters at most, loaded here); for GGUF files, `kvjax.gguf.load_gguf_config` and
the loaded parameters of a tiny synthetic file (tests/test_gguf.py's `_write_gguf`). The real
packaged files are read for their header only (never their tensors).
"""
import json
import time

import pytest

import kvjax
from kvjax import models
from kvjax.bundled import bundled_config, load_bundled
from kvjax.cli import main
from kvjax.hf import CheckpointError
from kvjax.models import read_config
from kvjax.models_cli import model_rows, shape_of, table
from test_gguf import _write_gguf


def test_lists_bundled_and_packaged_names_with_their_shapes(capsys):
    t0 = time.perf_counter()
    assert main(["models", "--json"]) == 0
    elapsed = time.perf_counter() - t0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(models.model_names())
    assert {"text", "recall", "smollm2-135m-instruct", "gemma3-270m"} <= set(rows)
    for name in ("text", "recall"):
        r, cfg = rows[name], bundled_config(name)
        assert (r["source"], r["layers"], r["d_model"], r["heads"], r["kv_heads"], r["vocab"], r["context"]) == \
            ("bundled", cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.max_position)
        assert r["params"] == kvjax.param_count(load_bundled(name)[1])
        assert r["format"] == "safetensors bfloat16"
    s = rows["smollm2-135m-instruct"]
    if s["installed"]:
        assert (s["family"], s["layers"], s["d_model"], s["heads"], s["kv_heads"], s["vocab"], s["context"],
                s["format"]) == ("llama", 30, 576, 9, 3, 49152, 8192, "GGUF Q4_1")
        assert 134e6 < s["params"] < 135e6
    g = rows["gemma3-270m"]
    if g["installed"]:
        assert (g["family"], g["layers"], g["d_model"], g["vocab"], g["format"]) == \
            ("gemma3_text", 18, 640, 262144, "GGUF Q4_K_M")
    assert elapsed < 30     # ~1 s here once Gemma 3's file is assembled (once, ~250 MB)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["name", "source", "family", "layers"]
    assert "smollm2-135m-instruct" in out and "text" in out


def test_a_missing_package_shows_its_pip_command(monkeypatch, capsys):
    def locate():
        raise AssertionError("not called for a missing package")

    monkeypatch.setitem(models.PACKAGED, "fake-1m", models.Packaged(
        "fake-1m", "kvjax_no_such_package_xyz", "pip install kvjax-no-such-package", locate))
    row = next(r for r in model_rows() if r["name"] == "fake-1m")
    assert (row["installed"], row["install"]) == (False, "pip install kvjax-no-such-package")
    assert "fake-1m: not installed; install it with: pip install kvjax-no-such-package" in table([row])


def test_gguf_shape_agrees_with_the_loaded_model(tmp_path):
    import gguf

    from kvjax.gguf import load_gguf_config

    path = _write_gguf(tmp_path / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    cfg, family = read_config(str(path))
    assert cfg == load_gguf_config(path)[0] and family == "llama"
    shape = shape_of(path)
    _, params, _ = kvjax.load_model(str(path))
    assert shape["params"] == kvjax.param_count(params)
    assert shape["format"] == "GGUF F32/Q8_0"      # no general.file_type: the tensor types
    assert (shape["layers"], shape["d_model"], shape["vocab"], shape["context"]) == (1, 64, 256, 128)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        shape_of(bad)
    with pytest.raises(FileNotFoundError, match="not a model name"):
        read_config(str(tmp_path / "nowhere"))
