"""sharded_decode: the same generate on a device mesh and on one device, compared.

Uses the config's top-level `mesh` (e.g. {data: 2, model: 4}); with several processes
(`kvjax run --coordinator ...`) the mesh spans every process's devices. On random weights
of a preset shape it runs `kvjax.generate` once unsharded (one local device) and once
with params and cache sharded over the mesh, checks the tokens are identical, and
reports the cache layout (partition spec, per-device shard shape and bytes against the
whole cache), tokens/s of both, and the mesh. Without a mesh it runs on one device only.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

import kvjax
from kvjax.timing import measure
from kvjax import sharding

from ..models import ShapeConfig, model_config, random_params, random_tokens
from ..schema import ConfigError, option


@dataclass(frozen=True)
class Config(ShapeConfig):
    batch_size: int = option(8, min=1, help="rows (must be a multiple of the mesh's data axis)")
    prompt_len: int = option(32, min=1, help="prompt tokens per row")
    new_tokens: int = option(32, min=1, help="tokens generated per row")
    cache_kind: str = option("dense", choices=("dense", "int8", "window", "sinks"),
                             help="cache kind (window/sinks use max_len slots and wrap)")
    max_len: int = option(0, min=0, help="cache slots; 0 = prompt_len + new_tokens")
    repeats: int = option(3, min=1, help="timed measurements of generate (median)")
    min_seconds: float = option(0.2, min=0.0, help="calibrated length of one measurement (s)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    cfg = model_config("sharded_decode", c, run_cfg.dtype)
    m = run_cfg.mesh or {}
    if c.batch_size % m.get("data", 1):
        raise ConfigError(f"sharded_decode.batch_size: {c.batch_size} is not a multiple of the mesh's "
                          f"data axis ({m['data']})")
    if cfg.num_heads % m.get("model", 1):
        raise ConfigError(f"mesh.model: {m['model']} does not divide the model's num_heads="
                          f"{cfg.num_heads}")


def run(ctx, c: Config) -> dict:
    cfg = model_config("sharded_decode", c, ctx.dtype)
    params = random_params(cfg, ctx.seed)
    prompts = random_tokens(cfg, ctx.seed, (c.batch_size, c.prompt_len))
    lens = np.random.default_rng(ctx.seed).integers(1, c.prompt_len + 1, c.batch_size).astype(np.int32)
    max_len = c.max_len or c.prompt_len + c.new_tokens
    kw = dict(max_new_tokens=c.new_tokens, max_len=max_len, cache_kind=c.cache_kind)
    B = c.batch_size

    ref, t_one = measure(lambda _: kvjax.generate(cfg, params, prompts, lens, **kw), repeats=c.repeats,
                         min_seconds=c.min_seconds)
    row = {"devices": 1, "tok_s": B * c.new_tokens / t_one.median_s, "generate_s": t_one.median_s}
    headline = {"one_device_tok_s": row["tok_s"]}
    ctx.log({"layout": "one device", **row})
    rows = [["one device", 1, "-", "-", kvjax.cache_bytes(cfg, B, max_len, kind=c.cache_kind),
             row["generate_s"], row["tok_s"], "reference"]]
    if ctx.mesh is not None:
        mesh = ctx.mesh
        sp = sharding.shard_params(cfg, params, mesh)
        out, t_mesh = measure(lambda _: kvjax.generate(cfg, sp, prompts, lens, mesh=mesh, **kw),
                              repeats=c.repeats, min_seconds=c.min_seconds)
        same = bool((sharding.to_host(out.tokens) == sharding.to_host(ref.tokens)).all())
        shard = out.cache.keys[0].addressable_shards[0].data
        per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(out.cache))
        spec = str(out.cache.keys[0].sharding.spec)
        r = {"layout": f"mesh {dict(mesh.shape)}", "devices": int(mesh.size),
             "processes": jax.process_count(), "cache_spec": spec, "shard_shape": list(shard.shape),
             "cache_bytes_per_device": per_device, "tok_s": B * c.new_tokens / t_mesh.median_s,
             "generate_s": t_mesh.median_s, "tokens_identical": same}
        ctx.log(r)
        rows.append([r["layout"], r["devices"], spec, str(tuple(shard.shape)), per_device,
                     r["generate_s"], r["tok_s"], "identical" if same else "DIFFERENT"])
        headline.update(mesh=dict(mesh.shape), processes=jax.process_count(), tokens_identical=same,
                        mesh_tok_s=r["tok_s"], cache_bytes_per_device=per_device, ok=same)
    ctx.table(f"{cfg.name} shape, {c.cache_kind} cache, batch {B}, {c.new_tokens} new tokens",
              ["layout", "devices", "cache spec", "shard [B,K,S,H]", "cache bytes/device", "generate s",
               "tok/s", "tokens"], rows)
    if ctx.mesh is not None:
        ctx.note(f"Sharded tokens {'are identical to' if headline['tokens_identical'] else 'DIFFER from'} "
                 f"the one-device run; the layout rules are in kvjax/sharding.py.")
    return headline
