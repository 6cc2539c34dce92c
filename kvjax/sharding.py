"""Meshes and layouts: where every parameter and cache axis lives on a device mesh.

Axis letters as elsewhere (B batch, K kv heads, S slots, H head dim, D model, F mlp, V vocab).

Every array axis has a *logical* name; `RULES` maps logical names to mesh axes:

    batch    -> data      rows of the batch (and of the cache) split across data shards
    heads    -> model     query heads (q columns, o rows): Megatron-style tensor parallelism
    kv_heads -> model     k/v columns and the cache's K axis, when K divides the model axis
    mlp      -> model     gate/up columns, down rows
    vocab    -> model     embedding rows and lm_head columns, when V divides the model axis
    embed, sequence, head_dim -> replicated

When the model axis does not divide an optional axis (kv heads of a GQA/MQA model, a vocab
of 50257) that axis is replicated instead: every model shard computes all K/V heads of its
batch shard and keeps the whole cache for it. K/V projections are small in GQA/MQA
models, so the duplicated work is small, and the cache still never moves between devices.
Query heads and the batch must divide their mesh axes: otherwise `check_mesh` raises
naming both numbers.

`jax.jit` with `in_shardings`/`out_shardings` is how pjit is spelled today (pjit was folded
into jit); decode uses the shardings below (and the cache layouts' own, kvjax/cache/sharded.py)
as exactly those arguments.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig

AXES = ("data", "model")
RULES = {"batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}
# Which logical axis each parameter's dims carry, by the parameter's (module, leaf) name.
_PARAM_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): ("sequence", "embed"),
    ("q", "kernel"): ("embed", "heads"), ("q", "bias"): ("heads",),
    ("k", "kernel"): ("embed", "kv_heads"), ("k", "bias"): ("kv_heads",),
    ("v", "kernel"): ("embed", "kv_heads"), ("v", "bias"): ("kv_heads",),
    ("o", "kernel"): ("heads", "embed"), ("o", "bias"): ("embed",),
    ("gate", "kernel"): ("embed", "mlp"), ("up", "kernel"): ("embed", "mlp"),
    ("fc", "kernel"): ("embed", "mlp"), ("fc", "bias"): ("mlp",),
    ("down", "kernel"): ("mlp", "embed"), ("proj", "kernel"): ("mlp", "embed"),
    ("proj", "bias"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def make_mesh(spec: dict | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh from a spec such as {"data": 2, "model": 4}.

    Missing axes default to 1, except that with no spec at all every device goes to data.
    The product must equal the number of devices (all global devices by default).
    """
    devices = list(jax.devices() if devices is None else devices)
    spec = dict(spec or {"data": len(devices)})
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)}; kvjax meshes have axes {list(AXES)}")
    shape = tuple(int(spec.get(a, 1)) for a in AXES)
    if min(shape) < 1:
        raise ValueError(f"mesh axis sizes must be >= 1, got {spec}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices "
                         f"but {len(devices)} are available")
    return Mesh(np.array(devices).reshape(shape), AXES)


def layout(cfg: ModelConfig, mesh: Mesh) -> dict[str, str | None]:
    """Logical axis -> mesh axis for this model on this mesh (optional axes may fall back)."""
    m = mesh.shape["model"]
    rules = dict(RULES)
    if cfg.num_kv_heads % m:
        rules["kv_heads"] = None
    if cfg.vocab_size % m:
        rules["vocab"] = None
    if cfg.mlp_dim % m:
        rules["mlp"] = None
    return rules


def check_mesh(cfg: ModelConfig, mesh: Mesh, batch_size: int | None = None):
    """Raise when the mesh lacks kvjax's axes or cannot split the query heads or the batch evenly."""
    missing = [a for a in AXES if a not in mesh.shape]
    if missing:
        raise ValueError(f"the mesh has axes {list(mesh.axis_names)} but kvjax needs {list(AXES)} (missing "
                         f"{missing}); pass kvjax.make_mesh({{'data': D, 'model': M}}) or "
                         f"jax.make_mesh((D, M), ('data', 'model'))")
    m, d = mesh.shape["model"], mesh.shape["data"]
    if cfg.num_heads % m:
        raise ValueError(f"the mesh's model axis ({m}) does not divide num_heads={cfg.num_heads}")
    if batch_size is not None and batch_size % d:
        raise ValueError(f"the mesh's data axis ({d}) does not divide the batch size {batch_size}")


def auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types.

    `jax.make_mesh` returns Explicit axes (sharding in types), under which jit needs an
    explicit output sharding for every ambiguous op (the embedding gather first) and raises
    ShardingTypeError; kvjax places arrays with NamedSharding and lets jit propagate, so
    every sharding it makes is built on the Auto view of the mesh.
    """
    types = getattr(mesh, "axis_types", None)
    auto = jax.sharding.AxisType.Auto
    if not types or all(t == auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def logical_spec(logical: tuple, rules) -> P:
    return P(*(rules.get(a) for a in logical))


def param_shardings(cfg: ModelConfig, params, mesh: Mesh):
    """A pytree of NamedSharding matching `params`."""
    check_mesh(cfg, mesh)
    mesh = auto_axes(mesh)
    rules = layout(cfg, mesh)

    def one(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        logical = _PARAM_AXES.get(tuple(names[-2:]))
        if logical is None:  # norms (scale/bias over embed) and anything else: replicated
            logical = (None,) * np.ndim(leaf)
        return NamedSharding(mesh, logical_spec(logical, rules))

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(cfg: ModelConfig, params, mesh: Mesh):
    """Place params on the mesh according to the layout (no host round trip when already on device)."""
    return jax.device_put(params, param_shardings(cfg, params, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over data, everything else replicated."""
    return NamedSharding(auto_axes(mesh), P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(auto_axes(mesh), P())


def to_global(host_array, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full.

    Works on one host and across hosts: each process fills only its addressable shards.
    """
    arr = np.asarray(host_array)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def to_host(x) -> np.ndarray:
    """Gather a (possibly multi-process) global array to a full NumPy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def describe(mesh: Mesh) -> dict:
    """A JSON-friendly record of a mesh for results folders."""
    return {"axes": dict(mesh.shape), "devices": int(mesh.size),
            "device_kind": mesh.devices.flat[0].device_kind, "processes": jax.process_count()}


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start `jax.distributed` from arguments or the KVJAX_COORDINATOR / KVJAX_NUM_PROCESSES /
    KVJAX_PROCESS_ID environment variables. Does nothing when neither gives a coordinator.

    On CPU, cross-process collectives need gloo, which is switched on here. Must run before
    any other JAX call in the process.
    """
    coordinator = coordinator or os.environ.get("KVJAX_COORDINATOR")
    if not coordinator:
        return False
    num_processes = int(num_processes if num_processes is not None else os.environ["KVJAX_NUM_PROCESSES"])
    process_id = int(process_id if process_id is not None else os.environ["KVJAX_PROCESS_ID"])
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
