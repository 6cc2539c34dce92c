"""Run by test_sharding.py in a fresh process (device count and distributed init must
happen before JAX starts). Compares sharded generate with unsharded on the same inputs
and writes a JSON report to argv[1].

    python sharded_worker.py OUT.json MESH_JSON CONFIG_OVERRIDES_JSON [--distributed]
"""
import json
import re
import sys

import numpy as np

out_path, mesh_spec, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
distributed = "--distributed" in sys.argv

import jax  # noqa: E402

import kvjax  # noqa: E402
from kvjax import sharding  # noqa: E402

if distributed:
    assert sharding.init_distributed()   # from KVJAX_* environment variables

kind = overrides.pop("cache_kind", "dense")
if "layer_types" in overrides:          # JSON has lists; ModelConfig fields are tuples
    overrides["layer_types"] = tuple(overrides["layer_types"])
cfg = kvjax.ModelConfig.preset(overrides.pop("preset", "llama-tiny"), **overrides)
params = kvjax.init_params(cfg, jax.random.key(0), std=0.2)
mesh = sharding.make_mesh(mesh_spec)
# Ring kinds get fewer slots than the run needs, so they wrap while sharded.
B, S, N, MAX_LEN = 8, 10, 12, 40 if kind in ("dense", "int8") else 20
rng = np.random.default_rng(0)
prompts = rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
lens = rng.integers(1, S + 1, B).astype(np.int32)

# Reference on one local device, unsharded.
ref = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=N, max_len=MAX_LEN, cache_kind=kind)
ref_tokens = np.asarray(ref.tokens)

sp = sharding.shard_params(cfg, params, mesh)
out = kvjax.generate(cfg, sp, prompts, lens, max_new_tokens=N, max_len=MAX_LEN, mesh=mesh,
                     cache_kind=kind)
tokens = sharding.to_host(out.tokens)
# Continue through prefill + decode_step on the sharded cache (it must stay sharded).
logits, cache = kvjax.prefill(cfg, sp, prompts[:, :3], np.full(B, 3), out.cache)
logits, cache = kvjax.decode_step(cfg, sp, np.asarray(sharding.to_host(logits)).argmax(-1), cache)
ref_logits, ref_cache = kvjax.prefill(cfg, params, prompts[:, :3], np.full(B, 3), ref.cache)
ref_logits, _ = kvjax.decode_step(cfg, params, np.asarray(ref_logits).argmax(-1), ref_cache)

# Compiled decode step: which collectives produce arrays with a cache-slot (MAX_LEN) axis?
from kvjax.decode import mesh_programs  # noqa: E402

step_tokens = jax.ShapeDtypeStruct((B,), np.int32, sharding=sharding.batch_sharding(mesh, 1))
hlo = mesh_programs(cfg, mesh, kind, out.cache.num_sinks, rings=out.cache.rings)["decode"].lower(
    cfg, sp, step_tokens, kvjax.init_cache(cfg, B, MAX_LEN, mesh=mesh, kind=kind)).compile().as_text()
gathers = []
for line in hlo.splitlines():
    m = re.search(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute)\(", line)
    if m and str(MAX_LEN) in m.group(1).split(","):
        gathers.append(line.strip()[:200])

shard = cache.keys[0].addressable_shards[0].data
report = {
    "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
    "tokens_equal": bool((tokens == ref_tokens).all()),
    "tokens": tokens.tolist(),
    "logits_max_err": float(np.abs(np.asarray(sharding.to_host(logits)) - np.asarray(ref_logits)).max()),
    "cache_spec": str(cache.keys[0].sharding.spec),
    "shard_shape": list(shard.shape), "shard_bytes": int(shard.nbytes), "itemsize": shard.dtype.itemsize,
    "kind": cache.kind, "rings": list(cache.rings), "max_len_seen": int(sharding.to_host(cache.lengths).max()),
    "global_shape": list(cache.keys[0].shape),
    "cache_gathers": gathers,
    "layout": sharding.layout(cfg, mesh),
}
if jax.process_index() == 0:
    with open(out_path, "w") as f:
        json.dump(report, f)
