"""Saved caches: exact round trip, clear refusals, atomic writes, resume in a new process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import INIT_STD, model

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("kind, dtype", [("dense", "float32"), ("dense", "bfloat16"), ("int8", None),
                                         ("window", None), ("sinks", None)])
def test_round_trip_is_exact(tmp_path, kind, dtype, rng):
    cfg, params = model("llama-tiny")
    cache = kvjax.init_cache(cfg, 2, 12, dtype=dtype, kind=kind)
    _, cache = kvjax.prefill(cfg, params, rng.integers(0, 320, (2, 9), dtype=np.int32), [9, 4], cache)
    path = kvjax.save_cache(tmp_path / "c.kvcache", cache, cfg)
    back = kvjax.load_cache(path, cfg, kind=kind)
    assert back.kind == cache.kind and back.num_sinks == cache.num_sinks
    a, b = jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_mismatched_model_or_kind_is_refused(tmp_path):
    cfg, params = model("llama-tiny")
    path = kvjax.save_cache(tmp_path / "c.kvcache", kvjax.init_cache(cfg, 1, 8), cfg)
    with pytest.raises(ValueError, match=r"saved for a different model \(rope_theta: saved 10000.0, now 500.0\)"):
        kvjax.load_cache(path, cfg.replace(rope_theta=500.0))
    with pytest.raises(ValueError, match=r"num_kv_heads: saved 2, now 1"):
        kvjax.load_cache(path, kvjax.ModelConfig.preset("mqa-tiny"))
    with pytest.raises(ValueError, match=r"holds a 'dense' cache, not the requested kind 'int8'"):
        kvjax.load_cache(path, cfg, kind="int8")
    # Saved without a config: the shape check still catches another model.
    bare = kvjax.save_cache(tmp_path / "bare.kvcache", kvjax.init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match=r"\(layers, kv heads, head dim\) = \(2, 2, 16\), but this model needs \(2, 1, 16\)"):
        kvjax.load_cache(bare, kvjax.ModelConfig.preset("mqa-tiny"))
    with pytest.raises(FileNotFoundError, match="no cache file"):
        kvjax.load_cache(tmp_path / "missing.kvcache")


def test_a_crash_mid_save_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    cfg, _ = model("llama-tiny")
    path = tmp_path / "c.kvcache"
    kvjax.save_cache(path, kvjax.init_cache(cfg, 1, 8), cfg)
    before = path.read_bytes()

    def crash(f, **arrays):                      # write half a file, then die
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        kvjax.save_cache(path, kvjax.init_cache(cfg, 2, 8), cfg)
    assert path.read_bytes() == before            # the old cache is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.kvcache"]   # no temporary left behind
    monkeypatch.undo()
    (tmp_path / "torn.kvcache").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="not a readable kvjax cache file"):
        kvjax.load_cache(tmp_path / "torn.kvcache")


RESUME = """
import sys, json, numpy as np, jax
sys.path.insert(0, {root!r})
import kvjax
cfg = kvjax.ModelConfig.preset("llama-tiny")
params = kvjax.init_params(cfg, jax.random.key(0), std={std})
cache = kvjax.load_cache(sys.argv[1], cfg)
turn2 = np.array(json.loads(sys.argv[2]), np.int32)
out = kvjax.generate(cfg, params, turn2, max_new_tokens=10, cache=cache)
print(json.dumps(np.asarray(out.tokens).tolist()))
"""


def test_conversation_resumes_in_a_new_process(tmp_path, rng):
    cfg, params = model("llama-tiny")
    turn1 = rng.integers(0, 320, (2, 7), dtype=np.int32)
    turn2 = rng.integers(0, 320, (2, 4), dtype=np.int32)
    out1 = kvjax.generate(cfg, params, turn1, [7, 5], max_new_tokens=6, max_len=48)
    path = kvjax.save_cache(tmp_path / "conv.kvcache", out1.cache, cfg)

    # The uninterrupted run, continuing from the same (in-memory) history.
    history = kvjax.load_cache(path, cfg)
    straight = kvjax.generate(cfg, params, turn2, max_new_tokens=10, cache=history)

    proc = subprocess.run([sys.executable, "-c", RESUME.format(root=ROOT, std=INIT_STD), str(path),
                           json.dumps(turn2.tolist())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert resumed == np.asarray(straight.tokens).tolist()


def test_atomic_write_keeps_usual_permissions_and_leaves_nothing_on_failure(tmp_path):
    import os
    import stat

    from kvjax.atomic import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.txt", "done")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    def dies(p):
        p.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", dies)
    assert target.read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
