"""What every press shares: the inputs a layer hands it, budgets computed on the host, and the
per-head top-k selection.

Axis letters: B batch, T chunk tokens, K kv heads, N query heads, G = N / K, H head dim,
D model, L layers.

A press decides which tokens of a chunk each kv head keeps (`Press.keep`). It sees the
chunk through `LayerInputs`, built inside the attention layer while the chunk is
prefilled: the attention input, queries before and after rotary, keys as cached (after
rotary), values, positions, and, for presses that ask for it, the attention each key
received. Budgets (how many tokens a row keeps) depend on the row's length and the
compression ratio only, so they are computed on the host in float64 exactly as kvpress
computes them (`int(n * (1 - ratio))`) and enter the jitted program as traced int32
arrays: a new ratio changes data, never the compiled program.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..cache.pressed import Keep  # noqa: F401  (the decision a press returns; the pressed layout writes it)
from ..config import ModelConfig


@dataclass
class LayerInputs:
    """One layer's view of the chunk being pressed (traced arrays; not a pytree)."""
    cfg: ModelConfig
    layer: int
    x: jax.Array           # [B, T, D] attention input (after the layer's norm)
    q: jax.Array           # [B, T, N, H] queries before rotary
    q_rot: jax.Array       # [B, T, N, H] queries as attention used them (rotated)
    k: jax.Array           # [B, T, K, H] keys as cached (rotated)
    v: jax.Array           # [B, T, K, H]
    positions: jax.Array   # int32 [B, T]
    lengths: jax.Array     # int32 [B] real tokens of the chunk per row
    inv_freq: jax.Array | None   # [H/2] rotary inverse frequencies (None: learned positions)
    o_kernel: jax.Array    # [N * H, D] this layer's output projection
    attn_sums: jax.Array | None  # float32 [B, N, T] attention each key received (needs_attention)
    budget: dict           # this layer's host-computed int32 arrays, e.g. n_kept [B]

    @property
    def valid(self) -> jax.Array:
        """bool [B, T]: real (non-padding) tokens of the chunk."""
        T = self.k.shape[1]
        return jnp.arange(T, dtype=jnp.int32)[None, :] < self.lengths[:, None]


def n_kept(n: np.ndarray, ratio: float) -> np.ndarray:
    """kvpress's `compute_n_kept`: max(1, int(n * (1 - ratio))), in float64 on the host."""
    n = np.asarray(n, np.int64)
    return np.maximum(1, (n * (1.0 - ratio)).astype(np.int64)).astype(np.int32)


def check_ratio(ratio, name: str = "compression_ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0 <= ratio < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


class Press:
    """Base of every press. Subclasses are frozen dataclasses (hashable: static under jit).

    Subclasses implement `keep(inp) -> Keep` (traced) and `host_budgets(n, cfg)` (host:
    dict of int arrays [L, B, ...]); `kept_bound(n, cfg)` is the most slots any kv head of
    a layer may take, [L, B], used to check the cache has room before anything runs.
    """
    needs_attention = False    # asks the layer for `attn_sums`
    needs_rotary = False       # needs rotary positions (refused on learned-position models)

    def static(self):
        """The press with its compression ratio removed: the part the compiled program depends on."""
        return _strip_ratio(self)

    def host_budgets(self, n: np.ndarray, cfg: ModelConfig) -> dict:
        raise NotImplementedError

    def kept_bound(self, n: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return self.host_budgets(n, cfg)["n_kept"]

    def keep(self, inp: LayerInputs) -> Keep:
        raise NotImplementedError

    def check_model(self, cfg: ModelConfig) -> None:
        if self.needs_rotary and cfg.positions != "rotary":
            raise ValueError(f"{type(self).__name__} needs rotary positions; this model has "
                             f"positions={cfg.positions!r}")

    def check_lengths(self, n: np.ndarray) -> None:
        """Refuse rows the press cannot score (e.g. shorter than a SnapKV window)."""


def _strip_ratio(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "compression_ratio":
                changes[f.name] = None
            elif isinstance(v, Press):
                changes[f.name] = _strip_ratio(v)
        if not changes:
            return obj
        new = copy.copy(obj)               # no __post_init__: a stripped ratio is not a user value
        for name, value in changes.items():
            object.__setattr__(new, name, value)
        return new
    return obj


class ScorerPress(Press):
    """A press that scores every token per kv head and keeps the top `n_kept` of each head."""

    def score(self, inp: LayerInputs) -> jax.Array:
        """float32 [B, K, T]: higher is kept first. Padding scores are ignored."""
        raise NotImplementedError

    def host_budgets(self, n, cfg):
        kept = n_kept(n, self.compression_ratio)
        return {"n_kept": np.broadcast_to(kept, (cfg.num_layers, len(kept))).copy()}

    def keep(self, inp: LayerInputs) -> Keep:
        return Keep(top_per_head(self.score(inp), inp.valid, inp.budget["n_kept"]))


def top_per_head(scores: jax.Array, valid: jax.Array, n: jax.Array) -> jax.Array:
    """bool [B, K, T]: each (row, kv head) keeps its n[b] (or n[b, k]) best valid tokens.

    Ties go to the lower index (a stable sort, like `lax.top_k`); kvpress uses torch.topk,
    whose tie order is unspecified, so the two agree wherever no tie sits at the cut.
    """
    s = jnp.where(valid[:, None, :], scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    limit = n[:, None, None] if n.ndim == 1 else n[..., None]
    return (rank < limit) & valid[:, None, :]


def always_keep(scores: jax.Array, where: jax.Array) -> jax.Array:
    """Scores with positions `where` [B, T] (or [B, K, T]) raised above every other score of the
    row, as kvpress pads windows and sinks with `max + 1`."""
    w = where[:, None, :] if where.ndim == 2 else where
    top = jnp.max(jnp.where(w, -jnp.inf, scores), axis=(1, 2), keepdims=True)
    return jnp.where(w, top + 1.0, scores)


def group_mean(x: jax.Array, K: int) -> jax.Array:
    """[B, N, T] -> [B, K, T]: mean over the G query heads of each kv head."""
    B, N, T = x.shape
    return x.reshape(B, K, N // K, T).mean(axis=2)


def heads_first(a: jax.Array) -> jax.Array:
    """[B, T, X, H] -> [B, X, T, H]."""
    return jnp.swapaxes(a, 1, 2)

