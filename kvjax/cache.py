"""The KV cache: an immutable pytree of fixed-shape buffers plus per-row lengths.

Axis letters: B batch, K kv heads, S cache slots (max_len), H head dim, T chunk length.

Layout: `keys[l]` and `values[l]` are separate arrays of shape [B, K, S, H], one per layer,
and `lengths` is int32 [B] (valid tokens per row; slot s of row b holds position s).

Why this layout:
  * One array per layer (a tuple, not one stacked [L, ...] array): the model unrolls its
    layers, so each layer reads and updates its own buffer and XLA aliases every buffer
    to its donated input independently; no dynamic slice over a layer axis, and no risk
    of a scan carry copying the whole stack.
  * [B, K, S, H]: attention for one (row, kv head) reads a contiguous [S, H] block, and
    the two einsums (`BKGTH,BKSH->BKGTS`, `BKGTS,BKSH->BKGTH`) need no transpose of the cache.
  * `lengths` per row, not one shared index: ragged batches need no left padding, and the
    same `prefill` appends a new chunk (a conversation turn) at each row's own end.

The cache is data: functions take one and return a new one. At the jit boundary it is
donated, so XLA writes the new token's K/V into the same memory (see decode.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


@dataclass(frozen=True)
class KVCache:
    keys: tuple        # L arrays [B, K, S, H]
    values: tuple      # L arrays [B, K, S, H]
    lengths: jax.Array  # int32 [B]: valid tokens per row
    kind: str = "dense"

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self):
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        """Exact bytes of every array this cache holds (buffers and lengths)."""
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(KVCache, data_fields=["keys", "values", "lengths"],
                                 meta_fields=["kind"])


def _resolve_dtype(cfg: ModelConfig, dtype) -> np.dtype:
    return jnp.dtype(dtype if dtype is not None else cfg.dtype)


def _check_sizes(batch_size: int, max_len: int):
    for name, v in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> int:
    """Bytes `init_cache(cfg, batch_size, max_len, dtype)` allocates, computed without allocating."""
    _check_sizes(batch_size, max_len)
    per_buffer = batch_size * cfg.num_kv_heads * max_len * cfg.head_dim
    return 2 * cfg.num_layers * per_buffer * _resolve_dtype(cfg, dtype).itemsize + 4 * batch_size


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, mesh=None) -> KVCache:
    """An empty cache: zero buffers of [B, K, max_len, H] per layer and lengths 0.

    `dtype` defaults to the model's dtype (`cfg.dtype`). With a `mesh` (see sharding.py)
    the buffers are created directly in their sharded layout.
    """
    _check_sizes(batch_size, max_len)
    if mesh is not None:
        from .sharding import init_sharded_cache  # sharding imports this module
        return init_sharded_cache(cfg, batch_size, max_len, mesh, dtype)
    dt = _resolve_dtype(cfg, dtype)
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))  # noqa: E731
    return KVCache(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32))


def write_chunk(buf: jax.Array, new: jax.Array, starts: jax.Array, lengths: jax.Array) -> jax.Array:
    """Write each row's first `lengths[b]` tokens of `new` at slots starts[b] ... into `buf`.

    buf: [B, K, S, H]; new: [B, T, K, H]; starts, lengths: int32 [B].
    Padding tokens (t >= lengths[b]) get an out-of-range slot and are dropped, so a chunk
    padded past the end of the buffer never shifts or clips a real write (which a clamped
    `dynamic_update_slice` would do).
    """
    T, S = new.shape[1], buf.shape[2]
    t = jnp.arange(T, dtype=jnp.int32)
    slots = jnp.where(t[None, :] < lengths[:, None], starts[:, None] + t[None, :], S)  # [B, T]; S = dropped

    def write_row(row_buf, row_new, row_slots):  # [K, S, H], [T, K, H], [T]
        return row_buf.at[:, row_slots, :].set(row_new.transpose(1, 0, 2).astype(row_buf.dtype),
                                               mode="drop")

    # vmap over rows (rather than a scatter indexed by (row, slot)) makes the batch a
    # batching dimension of the scatter, so a batch-sharded cache updates shard-locally.
    return jax.vmap(write_row)(buf, new, slots)
