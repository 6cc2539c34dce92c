"""Sharded decoding on 8 simulated CPU devices (and 2 processes x 4 devices): same tokens
as one device, the cache stays in the promised layout, and no step gathers the cache.

Each case runs in a subprocess because the device count (XLA_FLAGS) and
`jax.distributed` must be set before JAX starts.
"""
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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
    # layer 0 windowed (a 6-slot ring that wraps), layer 1 full (40 slots): a hybrid cache
    "4x2 hybrid (sliding, full), dense": (
        {"data": 4, "model": 2}, {"sliding_window": 6, "layer_types": ["sliding", "full"]},
        "PartitionSpec('data', 'model', None, None)", [2, 1, 6, 16]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_generate_matches_one_device(tmp_path, case):
    mesh, overrides, spec, shard = CASES[case]
    r = _run(tmp_path, mesh, overrides)
    assert r["devices"] == 8
    assert r["tokens_equal"], r["tokens"]
    # float32, same math in another order: 2e-4. int8: a K/V value within float noise of a
    # rounding boundary flips by one code step (1/127 of its row's absmax), which moves a
    # logit by up to ~1e-3 on these weights (measured 3.0e-4 on an AVX-512 CPU).
    tol = 1e-3 if overrides.get("cache_kind") == "int8" else 2e-4
    assert r["logits_max_err"] < tol
    assert r["cache_spec"] == spec.replace("PartitionSpec", "P")
    assert r["shard_shape"] == shard
    assert r["shard_bytes"] == r["itemsize"] * shard[0] * shard[1] * shard[2] * shard[3]
    assert r["kind"] == overrides.get("cache_kind", "dense")
    if r["kind"] in ("window", "sinks") or r["rings"]:
        assert r["max_len_seen"] > shard[2]             # the ring wrapped while sharded
    assert r["rings"] == ([6, 0] if "layer_types" in overrides else [])
    assert r["cache_gathers"] == []                     # no collective moves a cache buffer


def test_presses_on_a_mesh_match_one_device():
    """A press on a sharded cache (2x4 mesh): the same kept positions per layer and kv head and
    the same tokens as on one device, for a per-head press (SnapKV: pressed cache sharded over
    data and model), AdaKV's pool (sharded over data) and DecodingPress (KeyDiff: no score ties
    that tensor-parallel float noise could break differently)."""
    code = f"""
import sys; sys.path.insert(0, {ROOT!r})
import json, numpy as np, jax, kvjax
from kvjax import press as P
jax.config.update("jax_numpy_rank_promotion", "raise")
cfg = kvjax.ModelConfig.preset("llama-tiny").replace(num_heads=8, num_kv_heads=4, head_dim=16)
params = kvjax.init_params(cfg, jax.random.key(0), std=0.2)
mesh = kvjax.make_mesh({{"data": 2, "model": 4}})
sp = kvjax.sharding.shard_params(cfg, params, mesh)
rng = np.random.default_rng(0)
ctx = rng.integers(0, cfg.vocab_size, (4, 40)).astype(np.int32); lens = np.array([40, 23, 31, 35])
q = rng.integers(0, cfg.vocab_size, (4, 4)).astype(np.int32); ql = np.array([4, 2, 3, 4])
res = {{}}
for name, p in (("snapkv", P.SnapKVPress(0.5, 8, 5)), ("adakv", P.AdaKVPress(P.KnormPress(0.5)))):
    outs = []
    for m in (None, mesh):
        cache = kvjax.init_cache(cfg, 4, 40, mesh=m)
        _, cache = kvjax.prefill(cfg, params if m is None else sp, ctx, lens, cache, press=p)
        kept = [kvjax.sharding.to_host(k) for k in P.kept_positions(cache)]
        out = kvjax.generate(cfg, params if m is None else sp, q, ql, max_new_tokens=8, cache=cache)
        outs.append((kept, kvjax.sharding.to_host(out.tokens), str(getattr(out.cache.keys[0].sharding, "spec", ""))))
    res[name] = [all(np.array_equal(a, b) for a, b in zip(outs[0][0], outs[1][0])),
                 bool(np.array_equal(outs[0][1], outs[1][1])), outs[1][2]]
dp = P.DecodingPress(P.KeyDiffPress(), 8, 16)
t = [kvjax.sharding.to_host(kvjax.generate(cfg, params if m is None else sp, q, ql, max_new_tokens=30,
                                           max_len=24, mesh=m, press=dp).tokens) for m in (None, mesh)]
res["decoding"] = bool(np.array_equal(t[0], t[1]))
print(json.dumps(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["snapkv"] == [True, True, "P('data', 'model', None, None)"]
    assert res["adakv"] == [True, True, "P('data', None, None, None)"]
    assert res["decoding"] is True


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


# jax.distributed has no "any free port" option: the coordinator (process 0) binds the port
# it is given. A port found free here is released before process 0 binds it, so another
# program can take it in between. Then the coordinator's gRPC server fails to bind
# (process 0 logs "Failed to add port" and dies) and process 1 would wait for it until its
# initialization timeout. So the pair is stopped as soon as either process fails, and a
# bind failure relaunches it on a fresh port.
BIND_FAILURES = ("Failed to add port", "Address already in use", "address already in use")
ATTEMPTS = 3


def _fresh_ports():
    return (_free_port() for _ in itertools.count())


def _run_pair(command, log_dir, ports=None, timeout=300, before_attempt=None):
    """Run processes 0 and 1 of a two-process job; return their stderr texts.

    command(pid, port) -> (argv, env, cwd). Output goes to files in log_dir (a pipe left
    unread could fill and block a child). Children are always killed on the way out.
    """
    ports = ports if ports is not None else _fresh_ports()
    log_dir = Path(log_dir)
    for attempt in range(ATTEMPTS):
        port = next(ports)
        if before_attempt is not None:
            before_attempt()
        procs, logs, timed_out = [], [], False
        try:
            for pid in range(2):
                argv, env, cwd = command(pid, port)
                out = open(log_dir / f"attempt{attempt}-p{pid}.out", "w")
                err = open(log_dir / f"attempt{attempt}-p{pid}.err", "w")
                logs.append((out, err))
                procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True))
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break                     # done, or one failed: the other would wait for it
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            for out, err in logs:
                out.close()
                err.close()
        errs = [(log_dir / f"attempt{attempt}-p{pid}.err").read_text() for pid in range(len(procs))]
        codes = [p.returncode for p in procs]
        if codes == [0, 0] and not timed_out:
            return errs
        if attempt + 1 < ATTEMPTS and any(m in e for e in errs for m in BIND_FAILURES):
            continue                          # the port was taken before process 0 bound it
        report = "\n".join(f"--- process {pid}: exit {c} (stderr tail)\n{e[-3000:]}"
                           for pid, (c, e) in enumerate(zip(codes, errs)))
        why = f"timed out after {timeout} s" if timed_out else f"exit codes {codes}"
        pytest.fail(f"two-process run failed on attempt {attempt + 1} of {ATTEMPTS} (port {port}), "
                    f"{why}:\n{report}")


def test_two_processes_match_one_process(tmp_path):
    """Two processes on 127.0.0.1 with 4 CPU devices each form one 2x4 mesh."""
    out = tmp_path / "report.json"
    mesh, overrides = {"data": 2, "model": 4}, {}

    def command(pid, port):
        env = _env(4, KVJAX_COORDINATOR=f"127.0.0.1:{port}", KVJAX_NUM_PROCESSES="2",
                   KVJAX_PROCESS_ID=str(pid))
        return [sys.executable, WORKER, str(out), json.dumps(mesh), json.dumps(overrides),
                "--distributed"], env, None

    _run_pair(command, tmp_path)
    r = json.loads(out.read_text())
    assert r["processes"] == 2 and r["devices"] == 8
    assert r["tokens_equal"]            # equal to the unsharded run on the same inputs
    assert r["logits_max_err"] < 2e-4
    assert r["cache_gathers"] == []
    assert r["shard_shape"] == [4, 2, 40, 16]      # 2 kv heads < model axis 4: replicated


def test_a_taken_coordinator_port_is_retried_on_a_fresh_one(tmp_path):
    """The race above, forced: the first port is already bound and listening (as if another
    program had taken it), so process 0 cannot start the coordinator; the pair must be
    stopped at once (not after process 1's 300 s wait) and relaunched on a new port."""
    code = ("import sys; from kvjax import sharding; assert sharding.init_distributed(); "
            "import jax; print(jax.process_index(), jax.process_count(), jax.device_count())")

    def command(pid, port):
        env = _env(1, KVJAX_COORDINATOR=f"127.0.0.1:{port}", KVJAX_NUM_PROCESSES="2",
                   KVJAX_PROCESS_ID=str(pid))
        return [sys.executable, "-c", code], env, None

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        start = time.monotonic()
        _run_pair(command, tmp_path, ports=itertools.chain([taken], _fresh_ports()), timeout=120)
    assert time.monotonic() - start < 100
    first = (tmp_path / "attempt0-p0.err").read_text()
    assert any(m in first for m in BIND_FAILURES), first[-2000:]
    assert [(tmp_path / f"attempt1-p{pid}.out").read_text().split() for pid in range(2)] == [
        ["0", "2", "2"], ["1", "2", "2"]]


def test_kvjax_run_on_two_processes_writes_one_results_folder(tmp_path, tmp_path_factory):
    """`kvjax run` with --coordinator: both processes run, only process 0 writes results."""
    out = tmp_path / "results"
    config = str(Path(ROOT) / "experiments" / "sharded_decode.yaml")
    sets = ["--set", "sharded_decode.new_tokens=8", "--set", "sharded_decode.repeats=1"]

    def command(pid, port):
        return [sys.executable, "-m", "kvjax.cli", "run", config, "--out", str(out), *sets,
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)
                ], _env(4), str(tmp_path)

    # Logs go elsewhere: the test checks that nothing but the results folder is written here.
    _run_pair(command, tmp_path_factory.mktemp("run-logs"),
              before_attempt=lambda: shutil.rmtree(out, ignore_errors=True))
    assert (out / "COMPLETE").exists()
    summary = json.loads((out / "summary.json").read_text())
    headline = summary.get("headline", summary)
    assert headline["tokens_identical"] is True and headline["processes"] == 2
    env = json.loads((out / "env.json").read_text())
    assert env["mesh"]["axes"] == {"data": 2, "model": 4} and env["mesh"]["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]   # nothing else written
