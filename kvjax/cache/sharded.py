"""Sharded cache layouts: where every cache array lives on a ("data", "model") mesh.

Axis letters: B batch, K kv heads, S slots, H head dim, P pool slots.

Rows go over "data"; kv heads over "model" when they divide it (kvjax/sharding.py's logical
rules), otherwise every model shard keeps all heads of its rows. The decode programs pin
their output cache to these shardings, so a cache keeps its layout across steps.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import ModelConfig
from ..sharding import auto_axes, check_mesh, layout, logical_spec
from .core import KVCache, empty_cache


def cache_shardings(cfg: ModelConfig, mesh: Mesh, kind: str = "dense", num_sinks: int = 0,
                    layout_of: str = "plain", rings: tuple = ()) -> KVCache:
    """A KVCache-shaped pytree of NamedSharding for a cache of `kind`.

    keys/values [B, K, S, H] and int8 scales [B, K, S] over (data, model-or-replicated);
    slot positions [B, S] and lengths [B] over data. layout_of: "plain", "pressed" (adds
    per-head positions [B, K, S] and fills [B, K], laid out like the buffers) or "pooled"
    (AdaKV: one pool [B, 1, P, H] per layer, rows over data, the pool replicated over model
    since its kv heads are mixed; owners [B, P]). rings: a hybrid cache's per-layer ring
    sizes (its ring positions [B, W] are laid out like slot positions).
    """
    mesh = auto_axes(mesh)
    rules = layout(cfg, mesh)
    per_layer = lambda logical: tuple(NamedSharding(mesh, logical_spec(logical, rules))  # noqa: E731
                                      for _ in range(cfg.num_layers))
    heads = None if layout_of == "pooled" else "kv_heads"
    bufs = per_layer(("batch", heads, "sequence", "head_dim"))
    scales = per_layer(("batch", heads, "sequence")) if kind == "int8" else ()
    extra = {}
    if layout_of in ("pressed", "pooled"):
        extra = dict(head_pos=per_layer(("batch", heads, "sequence")),
                     head_fill=per_layer(("batch", "kv_heads")))
        if layout_of == "pooled":
            extra["head_owner"] = per_layer(("batch", "sequence"))
    return KVCache(keys=bufs, values=bufs, lengths=NamedSharding(mesh, P("data")),
                   key_scales=scales, value_scales=scales,
                   slot_pos=NamedSharding(mesh, P("data", None)) if (kind in ("window", "sinks") or rings)
                   else None, kind=kind, num_sinks=num_sinks, rings=tuple(rings), **extra)


def layout_name(cache: KVCache) -> str:
    return "pooled" if cache.pooled else "pressed" if cache.pressed else "plain"


def init_sharded_cache(cfg: ModelConfig, batch_size: int, max_len: int, mesh: Mesh, dtype=None,
                       kind: str = "dense", num_sinks: int = 0, rings: tuple = ()) -> KVCache:
    """`init_cache` created directly in its sharded layout (no full copy on any one device)."""
    check_mesh(cfg, mesh, batch_size)
    shardings = cache_shardings(cfg, mesh, kind, num_sinks, rings=rings)
    make = jax.jit(lambda: empty_cache(cfg, batch_size, max_len, dtype, kind=kind,
                                       num_sinks=num_sinks, hybrid=bool(rings)),
                   out_shardings=shardings)
    return make()


def mesh_of(cache: KVCache) -> Mesh | None:
    """The mesh a cache is laid out on, or None for a single-device cache."""
    sh = getattr(cache.lengths, "sharding", None)
    if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
        return sh.mesh
    return None
