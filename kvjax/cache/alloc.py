"""`init_cache`: an empty cache of any kind, on one device or laid out on a mesh."""
from __future__ import annotations

from ..config import ModelConfig
from .core import KVCache, cache_bytes, empty_cache, layer_rings, sinks_for
from .sharded import init_sharded_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, mesh=None,
               kind: str = "dense", num_sinks: int | None = None, bits: int | None = None,
               group_size: int | None = None, residual_length: int | None = None,
               hybrid: bool | None = None, ring_slack: int = 0) -> KVCache:
    """An empty cache of `max_len` slots per row (see `empty_cache` for every argument).

    mesh: create the buffers directly in their sharded layout (kvjax/cache/sharded.py):
    rows over "data", kv heads over "model"; no full copy lands on any one device.
    """
    if mesh is None:
        return empty_cache(cfg, batch_size, max_len, dtype, kind, num_sinks, bits, group_size,
                           residual_length, hybrid, ring_slack)
    # cache_bytes validates every argument as empty_cache does, without allocating anything
    cache_bytes(cfg, batch_size, max_len, dtype, kind, num_sinks, bits=bits, group_size=group_size,
                residual_length=residual_length, hybrid=hybrid, ring_slack=ring_slack)
    if kind == "kivi":
        raise ValueError("a kivi cache cannot be sharded yet; create it without a mesh")
    if kind in ("window", "sinks") and ring_slack:
        raise ValueError(f"ring_slack on a {kind} cache cannot be sharded yet (speculative decoding "
                         f"runs without a mesh); create it without a mesh")
    return init_sharded_cache(cfg, batch_size, max_len, mesh, dtype, kind, sinks_for(kind, num_sinks),
                              layer_rings(cfg, max_len, kind, hybrid, ring_slack))
