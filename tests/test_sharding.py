"""Sharded decoding on 8 simulated CPU devices (and 2 processes x 4 devices): same tokens
as one device, the cache stays in the promised layout, and no step gathers the cache.

Each case runs in a subprocess because the device count (XLA_FLAGS) and
`jax.distributed` must be set before JAX starts.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = str(Path(__file__).with_name("sharded_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(tmp_path, mesh, overrides, devices=8):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, WORKER, str(out), json.dumps(mesh), json.dumps(overrides)],
                          env=_env(devices), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


# (mesh, model overrides incl. cache kind, expected cache spec, expected per-device shard [B, K, S, H])
CASES = {
    "data-parallel 8x1, dense": ({"data": 8}, {}, "PartitionSpec('data', 'model', None, None)", [1, 2, 40, 16]),
    "tensor-parallel 1x8 (8 kv heads), int8": (
        {"model": 8}, {"num_heads": 8, "num_kv_heads": 8, "cache_kind": "int8"},
        "PartitionSpec('data', 'model', None, None)", [8, 1, 40, 16]),
    "tensor-parallel 1x8, GQA 2 kv heads, window": (
        {"model": 8}, {"num_heads": 8, "num_kv_heads": 2, "cache_kind": "window"},
        "PartitionSpec('data', None, None, None)", [8, 2, 20, 16]),
    "2x4 GPT-2, dense": ({"data": 2, "model": 4}, {"preset": "gpt2-tiny"},
                         "PartitionSpec('data', 'model', None, None)", [4, 1, 40, 16]),
    "2x4 MQA, sinks": ({"data": 2, "model": 4}, {"preset": "mqa-tiny", "cache_kind": "sinks"},
                       "PartitionSpec('data', None, None, None)", [4, 1, 20, 16]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_generate_matches_one_device(tmp_path, case):
    mesh, overrides, spec, shard = CASES[case]
    r = _run(tmp_path, mesh, overrides)
    assert r["devices"] == 8
    assert r["tokens_equal"], r["tokens"]
    assert r["logits_max_err"] < 2e-4                   # float32, same math in another order
    assert r["cache_spec"] == spec.replace("PartitionSpec", "P")
    assert r["shard_shape"] == shard
    assert r["shard_bytes"] == r["itemsize"] * shard[0] * shard[1] * shard[2] * shard[3]
    assert r["kind"] == overrides.get("cache_kind", "dense")
    if r["kind"] in ("window", "sinks"):
        assert r["max_len_seen"] > shard[2]             # the ring wrapped while sharded
    assert r["cache_gathers"] == []                     # no collective moves a cache buffer


def test_mesh_errors_name_both_numbers(tmp_path):
    code = f"""
import sys; sys.path.insert(0, {ROOT!r})
import numpy as np, jax, kvjax
from kvjax import sharding
cfg = kvjax.ModelConfig.preset("llama-tiny")   # 4 query heads
for spec, call in [({{"data": 2, "model": 4}}, lambda m: kvjax.init_cache(cfg, 3, 8, mesh=m)),
                   ({{"model": 8}}, lambda m: kvjax.init_cache(cfg, 8, 8, mesh=m)),
                   ({{"data": 3}}, lambda m: None), ({{"dta": 8}}, lambda m: None)]:
    try:
        call(sharding.make_mesh(spec)); print("no error", spec)
    except ValueError as e:
        print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "the mesh's data axis (2) does not divide the batch size 3"
    assert lines[1] == "the mesh's model axis (8) does not divide num_heads=4"
    assert lines[2] == "mesh {'data': 3, 'model': 1} needs 3 devices but 8 are available"
    assert lines[3].startswith("unknown mesh axis ['dta']")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """Two processes on 127.0.0.1 with 4 CPU devices each form one 2x4 mesh."""
    out = tmp_path / "report.json"
    port = _free_port()
    mesh, overrides = {"data": 2, "model": 4}, {}
    procs = []
    try:
        for pid in range(2):
            env = _env(4, KVJAX_COORDINATOR=f"127.0.0.1:{port}", KVJAX_NUM_PROCESSES="2",
                       KVJAX_PROCESS_ID=str(pid))
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(out), json.dumps(mesh), json.dumps(overrides), "--distributed"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:   # bounded: never leave a worker behind, even on timeout or failure
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    r = json.loads(out.read_text())
    assert r["processes"] == 2 and r["devices"] == 8
    assert r["tokens_equal"]            # equal to the unsharded run on the same inputs
    assert r["logits_max_err"] < 2e-4
    assert r["cache_gathers"] == []
    assert r["shard_shape"] == [4, 2, 40, 16]      # 2 kv heads < model axis 4: replicated


def test_kvjax_run_on_two_processes_writes_one_results_folder(tmp_path):
    """`kvjax run` with --coordinator: both processes run, only process 0 writes results."""
    port = _free_port()
    out = tmp_path / "results"
    config = str(Path(ROOT) / "experiments" / "sharded_decode.yaml")
    sets = ["--set", "sharded_decode.new_tokens=8", "--set", "sharded_decode.repeats=1"]
    procs = []
    try:
        for pid in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "kvjax.cli", "run", config, "--out", str(out), *sets,
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)],
                env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path)))
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert (out / "COMPLETE").exists()
    summary = json.loads((out / "summary.json").read_text())
    headline = summary.get("headline", summary)
    assert headline["tokens_identical"] is True and headline["processes"] == 2
    env = json.loads((out / "env.json").read_text())
    assert env["mesh"]["axes"] == {"data": 2, "model": 4} and env["mesh"]["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]   # nothing else written
