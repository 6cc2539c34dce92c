"""Saving and loading a KV cache: conversation memory that survives the process.

A cache file is one uncompressed `.npz` holding every array of the cache plus a JSON
record of its kind, sink count, dtypes and the model config it was built for. Loading
checks that record against the model it is loaded for and names every mismatch.

Writes are atomic: the file is written under a temporary name in the same folder,
flushed to disk, then renamed over the target, so a crash mid-save leaves either the old
file or none, never a truncated file that loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .atomic import atomic_write
from .cache import KVCache, cache_shardings, layout_name as sharding_layout
from .config import ModelConfig
from .sharding import check_mesh, to_host

FORMAT = "kvjax-cache-v1"


def config_record(cfg: ModelConfig) -> dict:
    """The config as plain JSON values (nested dataclasses become dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(cfg: ModelConfig) -> str:
    """A short hash of everything in the config that shapes the cache's contents."""
    record = config_record(cfg)
    record.pop("name", None)     # a renamed preset computes the same keys and values
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _leaves(cache: KVCache) -> dict[str, jax.Array]:
    out = {"lengths": cache.lengths}
    for field in ("keys", "values", "key_scales", "value_scales", "head_pos", "head_fill", "head_owner"):
        for i, arr in enumerate(getattr(cache, field)):
            out[f"{field}.{i}"] = arr
    for i, extra in enumerate(cache.extras):             # kivi: scales, minima, residual
        for name, arr in extra.items():
            out[f"extras.{i}.{name}"] = arr
    if cache.slot_pos is not None:
        out["slot_pos"] = cache.slot_pos
    return out


def save_cache(path, cache: KVCache, cfg: ModelConfig | None = None) -> Path:
    """Write `cache` (and, when given, the fingerprint of its model's config) to `path`.

    Arrays are gathered to the host first, so a sharded cache saves the same way.
    """

    path = Path(path)
    arrays, dtypes = {}, {}
    for name, arr in _leaves(cache).items():
        host = to_host(arr)
        dtypes[name] = str(jnp.dtype(host.dtype))
        # NumPy's .npz cannot describe bfloat16: store the raw bits, the dtype in the record.
        arrays[name] = host.view(np.uint16) if host.dtype == jnp.bfloat16 else host
    meta = {"format": FORMAT, "kind": cache.kind, "num_sinks": cache.num_sinks, "quant": list(cache.quant),
            "rings": list(cache.rings), "slack": cache.slack,
            "num_layers": len(cache.keys), "dtypes": dtypes,
            "config": None if cfg is None else config_record(cfg),
            "fingerprint": None if cfg is None else fingerprint(cfg)}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz"
            np.savez(f, **arrays)
    return atomic_write(path, write)


def load_cache(path, cfg: ModelConfig | None = None, kind: str | None = None, mesh=None) -> KVCache:
    """Read a cache written by `save_cache`.

    cfg: the model it will be used with; a cache saved for another config is refused,
    naming the fields that differ. kind: the kind you expect (refused if different).
    mesh: place the loaded cache on this mesh (see sharding.py).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cache file at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a kvjax cache file (format {meta.get('format')!r})")
            arrays = {name: data[name] for name in meta["dtypes"]}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ValueError) and "not a kvjax cache" in str(e):
            raise
        raise ValueError(f"{path} is not a readable kvjax cache file: {e}") from e

    if kind is not None and kind != meta["kind"]:
        raise ValueError(f"{path} holds a {meta['kind']!r} cache, not the requested kind {kind!r}")
    if cfg is not None:
        _check_model(path, meta, cfg, arrays)

    def get(name):
        dt = jnp.dtype(meta["dtypes"][name])
        host = arrays[name]
        return jnp.asarray(host.view(dt) if dt == jnp.bfloat16 else host)

    L = meta["num_layers"]
    per_layer = lambda field: tuple(get(f"{field}.{i}") for i in range(L)) if f"{field}.0" in arrays else ()  # noqa: E731
    extras = tuple({name.split(".", 2)[2]: get(name) for name in arrays if name.startswith(f"extras.{i}.")}
                   for i in range(L)) if "extras.0.k_res" in arrays else ()
    cache = KVCache(keys=per_layer("keys"), values=per_layer("values"), lengths=get("lengths"),
                    key_scales=per_layer("key_scales"), value_scales=per_layer("value_scales"),
                    slot_pos=get("slot_pos") if "slot_pos" in arrays else None,
                    head_pos=per_layer("head_pos"), head_fill=per_layer("head_fill"),
                    head_owner=per_layer("head_owner"), extras=extras,
                    kind=meta["kind"], num_sinks=meta["num_sinks"], quant=tuple(meta.get("quant", ())),
                    slack=int(meta.get("slack", 0)),
                    rings=tuple(meta.get("rings", ())))
    if mesh is not None:
        if cfg is None:
            raise ValueError("load_cache(..., mesh=...) needs the model config to lay the cache out")
        check_mesh(cfg, mesh, cache.batch_size)
        cache = jax.device_put(cache, cache_shardings(cfg, mesh, cache.kind, cache.num_sinks,
                                                      sharding_layout(cache), cache.rings))
    return cache


def _check_model(path, meta, cfg: ModelConfig, arrays):
    saved = meta.get("config")
    if saved is not None and meta["fingerprint"] != fingerprint(cfg):
        now = config_record(cfg)
        diff = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                for k in sorted(set(saved) | set(now)) if k != "name" and saved.get(k) != now.get(k)]
        raise ValueError(f"{path} was saved for a different model ({'; '.join(diff)})")
    k0 = arrays["keys.0"].shape
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    head_dim = arrays["extras.0.k_res"].shape[3] if "extras.0.k_res" in arrays else k0[3]   # kivi: codes are packed
    got = (meta["num_layers"], k0[1], head_dim)
    if got != want:
        raise ValueError(f"{path} holds a cache of (layers, kv heads, head dim) = {got}, but this model "
                         f"needs {want}")
