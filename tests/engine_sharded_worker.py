"""Run by test_engine_sharded.py in a fresh process with 8 host devices (XLA_FLAGS must be
set before JAX starts): the Engine on meshes gives the tokens it gives on one device.
Writes a JSON report to argv[1].

    python engine_sharded_worker.py OUT.json
"""
import json
import sys

import jax
import numpy as np

import kvjax
from kvjax import sharding

out_path = sys.argv[1]
cfg = kvjax.ModelConfig.preset("llama-tiny")
params = kvjax.init_params(cfg, jax.random.key(0), std=0.2)
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (5, 17, 33, 3, 26, 9, 12, 20, 30, 7)]
sps = [kvjax.SamplingParams(max_tokens=m) for m in (12, 3, 20, 7, 16, 1, 9, 14, 5, 18)]
sps[4] = kvjax.SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)   # sampled too
prompts.append(prompts[2][:16] + [1, 2, 3])                                       # a prefix hit
sps.append(kvjax.SamplingParams(max_tokens=6))
kw = dict(max_slots=4, max_len=64, page_size=8, decode_steps=4, prefill_chunk=16)


def run(mesh):
    with kvjax.Engine(cfg, params, mesh=mesh, **kw) as eng:
        outs = eng.generate(prompts, sps)
        keys = eng.keys[0]
        return ([o.tokens for o in outs], [o.cached_tokens for o in outs], str(getattr(keys.sharding, "spec", None)),
                eng.stats())


ref, ref_cached, _, _ = run(None)
report = {"devices": jax.device_count(), "cases": {}}
meshes = {
    "data8": sharding.make_mesh({"data": 8}),
    "data2_model4": sharding.make_mesh({"data": 2, "model": 4}),
    "jax.make_mesh 4x2 (explicit axes)": jax.make_mesh((4, 2), ("data", "model")),
}
for name, mesh in meshes.items():
    try:
        tokens, cached, spec, stats = run(mesh)
        report["cases"][name] = {"tokens_equal": tokens == ref, "cached_equal": cached == ref_cached,
                                 "pool_spec": spec, "compilations": stats["compilations"],
                                 "pages_in_use": stats["pages_in_use"], "error": None}
    except Exception as e:   # noqa: BLE001 - reported, the test decides
        report["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
with open(out_path, "w") as f:
    json.dump(report, f, indent=1)
