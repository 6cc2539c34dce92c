"""kvjax.Engine on 8 simulated CPU devices gives the tokens it gives on one device: requests
over "data", kv heads over "model", and a mesh from `jax.make_mesh` (Explicit axis types).

Runs in a subprocess: the device count (XLA_FLAGS) must be set before JAX starts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = str(Path(__file__).with_name("engine_sharded_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def test_sharded_engine_equals_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 8
    for name, case in report["cases"].items():
        assert case["error"] is None, (name, case["error"])
        assert case["tokens_equal"], name
        assert case["cached_equal"], name
        assert case["pages_in_use"] == 0, name
    # pools: pages replicated over data; llama-tiny's 2 kv heads split over a model axis of 2,
    # replicated over one of 4 (it does not divide them)
    assert report["cases"]["data8"]["pool_spec"] == "P()"
    assert report["cases"]["data2_model4"]["pool_spec"] == "P()"
    assert report["cases"]["jax.make_mesh 4x2 (explicit axes)"]["pool_spec"] == "P(None, 'model')"
