"""The caches a long-context benchmark compares, each holding one batch's context.

Axis letters: B samples, n context tokens, L layers, K kv heads.

Presses come from one shared prefill (`kvjax.decode.shared`): the context is captured once
and every press at every ratio is applied to that capture, written into a run cache of one
slot count for all presses and ratios (a ratio is data, never a new program). Baselines
prefill the context into their own cache: int8, KIVI 2/4-bit, a window ring and a
sinks + window ring of (1 - ratio) of the context, and, on models with sliding-window
layers, the hybrid cache (rings on local layers, full global layers).

Bytes are those each method really holds for one row's context (`kept_bytes`): a pressed
cache cut to its budgets, a ring of its size, a KIVI cache of its quantised groups and
residual; the run caches are larger by the room the question and answer need.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import press as P
from kvjax.buckets import round_up
from kvjax.decode.shared import apply_press

BASELINES = ("dense", "int8", "kivi2", "kivi4", "window", "sinks", "hybrid")
CONTEXT_BUCKET = 128   # cache shapes follow the context rounded up to this: tasks share programs


def bucket(n: int, multiple: int = CONTEXT_BUCKET) -> int:
    """n rounded up to a multiple: every shape derived from a context length goes through it, so
    the tasks of one length (fitted to 97-100% of it) compile each 30-layer program once."""
    return round_up(n, multiple)


@dataclass(frozen=True)
class Method:
    name: str            # row label: a press name (kvpress's, wrappers as Wrapper(Inner)) or a baseline
    family: str          # "press" or one of BASELINES
    ratio: float | None  # the compression ratio asked for (None: a ratio-free baseline)


def press_pools(press) -> bool:
    """AdaKV pools the K heads' slots: its run cache is a dense one the press turns into a pool."""
    return bool(getattr(press, "pooled", False))


def run_slots(cfg, presses: list, n: int, room: int) -> int:
    """One slot count per layer for every press's run cache at context n: the largest budget
    (per kv head for a pooling press) plus the room after the context."""
    need = [-(-max(P.layer_budgets(p, cfg, bucket(n))) // (cfg.num_kv_heads if press_pools(p) else 1))
            for p in presses]
    return max(need, default=bucket(n)) + room


def on_hybrid(cfg, press, enabled: bool) -> bool:
    """Whether `press` runs on the model's hybrid cache (its full layers compacted, the windowed
    layers' rings kept): on models with sliding-window layers, unless the press pools heads
    (AdaKV) or re-rotates keys (KeyRerotation), which only a full cache takes."""
    return (enabled and has_local_layers(cfg) and not press_pools(press)
            and not isinstance(press, P.KeyRerotationPress))


def run_cache(cfg, B: int, slots: int, press, hybrid: bool = False):
    """The empty cache a press is applied into (per-head pressed layout, or dense for a pool);
    hybrid: the windowed layers are rings of their window."""
    if press_pools(press):
        return kvjax.init_cache(cfg, B, slots, hybrid=False)
    return P.pressed_cache(cfg, B, [slots] * cfg.num_layers, hybrid=hybrid)


def ring_size(n: int, ratio: float) -> int:
    """Slots of a window / sinks ring keeping (1 - ratio) of the context's bucket (one ring size
    per length, not per task)."""
    return max(1, int(bucket(n) * (1.0 - ratio)))


def baseline_cache(cfg, m: Method, B: int, n: int, slots: int, kivi: tuple[int, int], num_sinks: int):
    """An empty cache of baseline m for a context of n tokens: `slots` of capacity for the full
    caches (context, question and answer), rings of (1 - ratio) of the context's bucket."""
    group, residual = kivi
    if m.family == "int8":
        return kvjax.init_cache(cfg, B, slots, kind="int8", hybrid=False)
    if m.family in ("kivi2", "kivi4"):
        return kvjax.init_cache(cfg, B, bucket(slots, residual), kind="kivi", bits=int(m.family[-1]),
                                group_size=group, residual_length=residual)
    if m.family == "window":
        return kvjax.init_cache(cfg, B, ring_size(n, m.ratio), kind="window")
    if m.family == "sinks":
        return kvjax.init_cache(cfg, B, ring_size(n, m.ratio), kind="sinks", num_sinks=num_sinks)
    if m.family == "hybrid":
        return kvjax.init_cache(cfg, B, slots, hybrid=True)
    raise ValueError(f"no baseline cache for {m.family!r}")


def kept_bytes(cfg, m: Method, press, n: int, kivi: tuple[int, int], num_sinks: int,
               hybrid: bool = False) -> int:
    """Bytes of the cache that holds one row's n-token context under method m (no room)."""
    if m.family == "press":
        budgets = P.layer_budgets(press, cfg, n)
        if press_pools(press):
            return kvjax.cache_bytes(cfg, 1, -(-max(budgets) // cfg.num_kv_heads), hybrid=False)
        if hybrid:   # the hybrid cache's full layers share one slot count: the largest budget
            budgets = [max(budgets)] * len(budgets)
        return P.cache_bytes(cfg, 1, budgets, hybrid=hybrid)
    if m.family == "dense":
        return kvjax.cache_bytes(cfg, 1, n, hybrid=False)
    if m.family in ("kivi2", "kivi4"):
        group, residual = kivi
        return kvjax.cache_bytes(cfg, 1, bucket(n, residual), kind="kivi", bits=int(m.family[-1]),
                                 group_size=group, residual_length=residual)
    if m.family == "hybrid":
        return kvjax.cache_bytes(cfg, 1, n, hybrid=True)
    if m.family == "int8":
        return kvjax.cache_bytes(cfg, 1, n, kind="int8", hybrid=False)
    if m.family == "window":
        return kvjax.cache_bytes(cfg, 1, ring_size(n, m.ratio), kind="window")
    if m.family == "sinks":
        return kvjax.cache_bytes(cfg, 1, ring_size(n, m.ratio), kind="sinks", num_sinks=num_sinks)
    raise ValueError(m.family)


def press_cache(cfg, pre, press, B: int, slots: int, hybrid: bool = False):
    """The context's cache under `press` (None: every token) from the shared capture `pre`."""
    return apply_press(cfg, pre, press, run_cache(cfg, B, slots, press, hybrid))


def prefilled_baseline(cfg, params, m: Method, tokens, lens, slots: int, kivi, num_sinks: int):
    """A baseline's cache after `kvjax.prefill` of the context (`slots` of capacity)."""
    cache = baseline_cache(cfg, m, tokens.shape[0], int(np.max(lens)), slots, kivi, num_sinks)
    return kvjax.prefill(cfg, params, tokens, lens, cache)[1]


def has_local_layers(cfg) -> bool:
    """Whether the model has sliding-window layers (a hybrid cache differs from a full one)."""
    return any(cfg.layer_window(layer) is not None for layer in range(cfg.num_layers))


def ratio_axis(m: Method, bytes_: int, dense_bytes: int) -> float:
    """Where a method sits on the compression axis: its ratio, or (ratio-free baselines) the
    share of the dense cache's bytes it saves."""
    if m.family == "dense":
        return 0.0
    if m.ratio is not None:
        return float(m.ratio)
    return float(1.0 - bytes_ / dense_bytes)


def stack(caches: list):
    """Caches of one layout and shape as one batch (rows of caches[0] first)."""
    if len(caches) == 1:
        return caches[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)


def as_tokens(rows: list, multiple: int = 16, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, W] and lengths [B]: W is `width`, or the longest row rounded up to
    `multiple` (fewer programs)."""
    lens = np.array([len(r) for r in rows], np.int32)
    width = width or bucket(lens.max(), multiple)
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lens
