"""The KV cache: an immutable pytree of fixed-shape buffers plus per-row lengths.

Axis letters: B batch, K kv heads, S cache slots (max_len), H head dim, T chunk length.

Layout: `keys[l]` and `values[l]` are separate arrays of shape [B, K, S, H], one per layer,
and `lengths` is int32 [B]: tokens each row has seen (the next token's position).

Why this layout:
  * One array per layer (a tuple, not one stacked [L, ...] array): the model unrolls its
    layers, so each layer reads and updates its own buffer and XLA aliases every buffer
    to its donated input independently; no dynamic slice over a layer axis, and no risk
    of a scan carry copying the whole stack.
  * [B, K, S, H]: attention for one (row, kv head) reads a contiguous [S, H] block, and
    the two einsums (`BKGTH,BKSH->BKGTS`, `BKGTS,BKSH->BKGTH`) need no transpose of the cache.
  * `lengths` per row, not one shared index: ragged batches need no left padding, and the
    same `prefill` appends a new chunk (a conversation turn) at each row's own end.

Kinds (one interface; `kind` and `num_sinks` are static pytree metadata):
  dense   slot s holds position s; full at S tokens (appending more raises).
  int8    as dense, K/V stored as int8 with a float32 absmax scale per (token, kv head)
          in `key_scales`/`value_scales` [B, K, S]; dequantised inside attention.
  window  a ring of S slots: position p lives in slot p mod S, so a query sees the last S
          tokens; memory is fixed however long generation runs. `slot_pos` [B, S] records
          the position held by each slot (-1: empty), which drives masks after wrap-around.
  kivi    KIVI (Liu et al. 2024), kvjax/cache/kivi.py: keys quantised per channel over groups of
          `group_size` tokens, values per token over groups of channels, 2 or 4 bits packed
          into uint8 (`keys`/`values` hold the codes); the last tokens stay in full
          precision in a residual until a block of `residual_length` fills. Scales, minima
          and the residual live in `extras`; `quant` = (bits, group_size, residual_length).
  sinks   StreamingLLM: slots [0, num_sinks) keep the first tokens forever, the other
          S - num_sinks slots are a ring of recent tokens. Keys are stored *before*
          rotation; attention assigns rotary positions by place in the cache (see
          attention.py), as the StreamingLLM paper found necessary for stable perplexity.
  paged   kvjax.Engine's storage (kvjax/cache/paged.py): keys/values are L pools of pages
          [P, K, Z, H] shared by every row, `page_table` [B, W] maps a row's page w to a pool
          page, and `lengths` counts each row's tokens before the chunk being written.
          Made by `paged.paged_cache`, not init_cache.

Hybrid (dense or int8, the default for models with windowed layers, e.g. Gemma 2/3 or a
Qwen2 with `max_window_layers`): a layer whose window W is shorter than max_len keeps a
ring of W slots (position p in slot p mod W, as the window kind), every other layer keeps
max_len slots. `rings` (static) gives each layer's ring size (0: a full layer) and
`slot_pos` [B, W] the positions the ring slots hold (all ring layers see the same tokens).
Outputs equal the masked full cache's exactly: a query of a windowed layer never looks
further back than W. `init_cache(..., hybrid=False)` allocates max_len on every layer.

Pooled (a pressed cache for head-wise budgets, AdaKV): the K heads' [K, S] slots of a layer
are one pool of P = K * S slots, keys [B, 1, P, H], with `head_owner` [B, P] naming the kv
head each slot belongs to; heads may hold very different numbers of tokens in the same
memory. Attention reads each slot once and masks it to its owner's query heads.

Pressed (any dense or int8 cache after a press, see kvjax/press/): each kv head keeps its
own set of tokens, so each layer adds `head_pos` [B, K, S_l] (the original position held
by each slot, -1: empty; kept slots are packed at the front in position order) and
`head_fill` [B, K] (slots used per head). `lengths` stays the position of the next token
(a pressed context continues at its uncompressed length, as kvpress does), so it is no
longer a slot count. Layers may have different slot counts S_l (PyramidKV budgets).

Hybrid pressed (a press on a hybrid cache): the full layers take the pressed layout above;
the ring layers stay rings (they already hold only their window, and keep every token of
it), with placeholders `head_pos` [B, K, 0] and `head_fill` [B, K] of zeros so every
per-layer tuple keeps one entry per layer (ring layers hold no per-head positions: 0
bytes, plus 4 bytes per row and kv head). `slot_pos` keeps the rings' positions as before.

The cache is data: functions take one and return a new one. At the jit boundary it is
donated, so XLA writes the new token's K/V into the same memory (see kvjax/decode/programs.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from . import kivi

KINDS = ("dense", "int8", "window", "sinks", "kivi")   # what init_cache makes
PAGED = "paged"   # the engine's kind: pools of pages shared by rows (kvjax/cache/paged.py)
KIVI_DEFAULTS = {"bits": 2, "group_size": 32, "residual_length": 128}
DEFAULT_SINKS = 4   # StreamingLLM's default: four initial tokens are enough to anchor attention


@dataclass(frozen=True)
class KVCache:
    keys: tuple             # L arrays [B, K, S, H] (int8 for kind "int8")
    values: tuple           # L arrays [B, K, S, H]
    lengths: jax.Array      # int32 [B]: tokens seen per row = position of the next token
    key_scales: tuple = ()  # int8 only: L arrays float32 [B, K, S]
    value_scales: tuple = ()
    slot_pos: jax.Array | None = None   # window/sinks: int32 [B, S]; hybrid: [B, W] of the
                                        # ring layers; -1 = empty slot
    head_pos: tuple = ()    # pressed only: L arrays int32 [B, K, S_l], position per slot, -1 = empty
    head_fill: tuple = ()   # pressed only: L arrays int32 [B, K], slots used per kv head
    head_owner: tuple = ()  # pooled only: L arrays int32 [B, P], kv head owning each pool slot, -1 empty
    extras: tuple = ()      # kivi only: L dicts of scales, minima and the full-precision residual
    page_table: jax.Array | None = None  # paged only (kvjax/engine): int32 [B, W] pool page of each
                                         # row's page w; keys/values are L pools [P, K, page, H]
    kind: str = "dense"
    num_sinks: int = 0
    quant: tuple = ()       # kivi only: (bits, group_size, residual_length), static
    rings: tuple = ()       # hybrid only: per layer its ring size W, or 0 for a full layer; static
    slack: int = 0          # window/sinks only: ring slots beyond the window (speculative decoding:
                            # rejected tokens never overwrite what the window still needs); static

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """Number of slots S of the full layers (for window/sinks, and a hybrid cache whose
        layers are all rings, the ring: not a limit on tokens). A hybrid pressed cache's
        full layers may hold fewer slots than its rings' window: max_len is theirs."""
        if self.rings:
            full = [k.shape[2] for k, r in zip(self.keys, self.rings) if not r]
            return max(full) if full else max(self.rings)
        return self.keys[0].shape[2]

    @property
    def hybrid(self) -> bool:
        """True for a cache with a ring on its windowed layers and max_len slots on the others."""
        return bool(self.rings)

    @property
    def all_rings(self) -> bool:
        """Every layer is a ring (a hybrid cache of a model windowed on every layer, e.g. Mistral)."""
        return bool(self.rings) and all(self.rings)

    @property
    def dtype(self):
        """The dtype keys and values are computed in (kivi: of its residual; int8: int8)."""
        return self.extras[0]["k_res"].dtype if self.kind == "kivi" else self.keys[0].dtype

    @property
    def head_dim(self) -> int:
        return self.extras[0]["k_res"].shape[-1] if self.kind == "kivi" else self.keys[0].shape[-1]

    @property
    def reads_live_prefix(self) -> bool:
        """Attention may read only a prefix of the slots (dense/int8, not pressed)."""
        return self.kind in ("dense", "int8") and not self.pressed and not self.all_rings

    @property
    def pressed(self) -> bool:
        """True once a press has compacted the cache: slots hold per-head positions."""
        return bool(self.head_pos)

    @property
    def pooled(self) -> bool:
        """True for a pressed cache whose kv heads share one pool of slots (AdaKV budgets)."""
        return bool(self.head_owner)

    def layer_slots(self, layer: int) -> int:
        return self.keys[layer].shape[2]

    @property
    def bounded(self) -> bool:
        """True for kinds that raise when full (dense, int8, kivi); window/sinks run on forever
        (as does a hybrid cache whose layers are all rings)."""
        return self.kind in ("dense", "int8", "kivi") and not self.all_rings

    def ring_view(self) -> "KVCache":
        """A hybrid cache's ring layers as one ring (they share `slot_pos` and the ring size)."""
        return self.layer_view(self.rings.index(max(self.rings)))

    def layer_view(self, layer: int) -> "KVCache":
        """Layer `layer` alone as a one-layer cache (no copy): a ring layer of a hybrid cache
        becomes a ring (slot_pos set), a full layer a plain dense/int8 cache (a pressed one,
        with its per-head positions, once a press has compacted it)."""
        ring = bool(self.rings) and self.rings[layer] > 0
        one = lambda t: (t[layer],) if t else ()  # noqa: E731
        per_head = one if not ring else (lambda t: ())  # noqa: E731  a ring holds no per-head slots
        return self.replace(keys=one(self.keys), values=one(self.values), key_scales=one(self.key_scales),
                            value_scales=one(self.value_scales), slot_pos=self.slot_pos if ring else None,
                            head_pos=per_head(self.head_pos), head_fill=per_head(self.head_fill),
                            head_owner=per_head(self.head_owner), rings=())

    def ring_layer(self, layer: int) -> bool:
        """Whether `layer` is a ring of a hybrid cache."""
        return bool(self.rings) and self.rings[layer] > 0

    @property
    def nbytes(self) -> int:
        """Exact bytes of every array this cache holds (buffers, scales, positions, lengths)."""
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    KVCache, data_fields=["keys", "values", "lengths", "key_scales", "value_scales", "slot_pos",
                          "head_pos", "head_fill", "head_owner", "extras", "page_table"],
    meta_fields=["kind", "num_sinks", "quant", "rings", "slack"])


def _resolve_dtype(cfg: ModelConfig, dtype) -> np.dtype:
    return jnp.dtype(dtype if dtype is not None else cfg.dtype)


def _check(batch_size: int, max_len: int, kind: str, num_sinks: int):
    for name, v in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; kinds are {list(KINDS)}")
    if kind == "sinks" and not 1 <= num_sinks < max_len:
        raise ValueError(f"a sinks cache needs 1 <= num_sinks < max_len; got num_sinks={num_sinks}, "
                         f"max_len={max_len}")


def sinks_for(kind: str, num_sinks) -> int:
    return (DEFAULT_SINKS if num_sinks is None else int(num_sinks)) if kind == "sinks" else 0


def _quant(kind: str, bits, group_size, residual_length) -> tuple:
    if kind != "kivi":
        if (bits, group_size, residual_length) != (None, None, None):
            raise ValueError(f"bits/group_size/residual_length are KIVI settings; kind is {kind!r}")
        return ()
    q = {"bits": bits, "group_size": group_size, "residual_length": residual_length}
    return tuple(KIVI_DEFAULTS[k] if v is None else int(v) for k, v in q.items())


def layer_rings(cfg: ModelConfig, max_len: int, kind: str = "dense", hybrid: bool | None = None,
                slack: int = 0) -> tuple:
    """Per-layer ring sizes of the cache `init_cache` makes (() when it is not hybrid).

    hybrid None (default): a ring of W slots on every layer whose window W is shorter than
    max_len, for dense and int8 caches; False: max_len slots on every layer; True: as None,
    but raise when no layer can have a ring (so a request for savings never silently gets none).
    slack: W + slack slots per ring (speculative decoding writes up to `slack` tokens past what
    it keeps; attention still masks by the model's window W, so the output is unchanged).
    """
    if hybrid is False:
        return ()
    reason = None
    if kind not in ("dense", "int8"):
        reason = (f"a {kind!r} cache has one layout on every layer (window and sinks caches are "
                  f"rings everywhere; kivi keeps max_len slots and masks the windows)")
    elif cfg.attention_sinks:
        reason = (f"the model keeps attention_sinks={cfg.attention_sinks} first tokens visible, "
                  f"which a ring of the window would drop")
    else:
        slack = _check_slack(slack)
        rings = tuple(w + slack if (w := cfg.layer_window(i)) is not None and w + slack < max_len else 0
                      for i in range(cfg.num_layers))
        if any(rings):
            return rings
        reason = (f"no layer of {cfg.name!r} has a window shorter than max_len={max_len} "
                  f"(windows: {[cfg.layer_window(i) for i in range(cfg.num_layers)]})")
    if hybrid:
        raise ValueError(f"hybrid=True: {reason}")
    return ()


def _slot_layout(cfg: ModelConfig, max_len: int, kind: str, rings: tuple, slack: int = 0) -> tuple[list, int]:
    """(slots of each layer's buffers, slots of `slot_pos` (0: none)) for init_cache and cache_bytes;
    slack: a window/sinks cache's extra ring slots."""
    if kind in ("window", "sinks"):
        return [max_len + slack] * cfg.num_layers, max_len + slack
    slots = [r or max_len for r in rings] if rings else [max_len] * cfg.num_layers
    return slots, (max(rings) if rings else 0)


def _check_slack(ring_slack) -> int:
    if not isinstance(ring_slack, (int, np.integer)) or isinstance(ring_slack, bool) or ring_slack < 0:
        raise ValueError(f"ring_slack must be an int >= 0, got {ring_slack!r}")
    return int(ring_slack)


def _ring_slack(kind: str, ring_slack) -> int:
    """The extra slots of a window/sinks cache's ring (0 for other kinds: their rings are per layer)."""
    slack = _check_slack(ring_slack)
    return slack if kind in ("window", "sinks") else 0


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, kind: str = "dense",
                num_sinks: int | None = None, pressed: bool = False, pooled: bool = False,
                bits: int | None = None,
                group_size: int | None = None, residual_length: int | None = None,
                hybrid: bool | None = None, ring_slack: int = 0) -> int:
    """Bytes `init_cache` allocates for these arguments, computed without allocating.

    pressed: the same cache once a press has compacted it (it adds per-head slot positions
    int32 [B, K, S] and fills int32 [B, K] per layer; kvjax.press.cache_bytes gives
    per-layer sizes). On a hybrid cache (hybrid None on a windowed model, as init_cache
    makes it, or True) only the full layers take positions; each ring layer adds a fill
    placeholder int32 [B, K]. hybrid=False: the pressed cache of max_len slots on every
    layer (what generate(press=...) allocates). pooled: once AdaKVPress has pooled it (a
    head id per slot too; never hybrid)."""
    _check(batch_size, max_len, kind, sinks_for(kind, num_sinks))
    quant = _quant(kind, bits, group_size, residual_length)
    if kind == "kivi":
        per = kivi.layer_bytes(batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, *quant,
                               _resolve_dtype(cfg, dtype))
        return cfg.num_layers * per + 4 * batch_size
    if pooled:
        if hybrid:
            raise ValueError("pooled=True: AdaKVPress pools every layer's kv heads, so a pooled cache "
                             "is never hybrid; pass hybrid=False or None")
        return (cache_bytes(cfg, batch_size, max_len, dtype, kind, pressed=True, hybrid=False)
                + cfg.num_layers * batch_size * cfg.num_kv_heads * max_len * 4)
    if pressed:
        if kind not in ("dense", "int8"):
            raise ValueError(f"only dense and int8 caches can be pressed, got kind {kind!r}")
        per_head = batch_size * cfg.num_kv_heads * 4
        rings = layer_rings(cfg, max_len, kind, hybrid) or (0,) * cfg.num_layers
        return (cache_bytes(cfg, batch_size, max_len, dtype, kind, hybrid=hybrid)
                + sum(per_head if r else per_head * (max_len + 1) for r in rings))
    slots, ring_slots = _slot_layout(cfg, max_len, kind, layer_rings(cfg, max_len, kind, hybrid, ring_slack),
                                     _ring_slack(kind, ring_slack))

    def per_layer(slots):
        values = batch_size * cfg.num_kv_heads * slots * cfg.head_dim
        n = 2 * values * (1 if kind == "int8" else _resolve_dtype(cfg, dtype).itemsize)
        if kind == "int8":
            n += 2 * batch_size * cfg.num_kv_heads * slots * 4            # float32 scales
        return n

    # buffers, slot positions of a ring (window/sinks, or a hybrid cache's ring layers), lengths
    return sum(per_layer(n) for n in slots) + batch_size * ring_slots * 4 + 4 * batch_size


def empty_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None,
                kind: str = "dense", num_sinks: int | None = None, bits: int | None = None,
               group_size: int | None = None, residual_length: int | None = None,
               hybrid: bool | None = None, ring_slack: int = 0) -> KVCache:
    """An empty cache of `max_len` slots per row on the default device (`init_cache` places
    it on a mesh).

    hybrid: on a model with windowed layers (layer_types / sliding_window), a dense or int8
    cache keeps only a ring of `window` slots on each windowed layer by default (see
    `layer_rings`); hybrid=False allocates max_len slots on every layer; ring_slack adds
    slots to each ring (for speculative decoding; a window/sinks cache then holds max_len +
    ring_slack slots and still attends over its window of max_len - num_sinks).

    dtype: storage dtype of dense/window/sinks buffers (default `cfg.dtype`; int8 ignores it).
    kind: "dense" | "int8" | "window" | "sinks" | "kivi"; num_sinks: sink slots for "sinks"
    (default 4); bits (2 or 4), group_size (32), residual_length (128): KIVI settings, with
    max_len a multiple of residual_length.
    """
    sinks = sinks_for(kind, num_sinks)
    _check(batch_size, max_len, kind, sinks)
    quant = _quant(kind, bits, group_size, residual_length)
    if kind == "kivi":
        dt = _resolve_dtype(cfg, dtype)
        layers = [kivi.init_layer(batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, *quant, dt)
                  for _ in range(cfg.num_layers)]
        return KVCache(keys=tuple(l.pop("k_codes") for l in layers),
                       values=tuple(l.pop("v_codes") for l in layers),
                       lengths=jnp.zeros((batch_size,), jnp.int32), extras=tuple(layers),
                       kind="kivi", quant=quant)
    rings = layer_rings(cfg, max_len, kind, hybrid, ring_slack)
    dt = jnp.int8 if kind == "int8" else _resolve_dtype(cfg, dtype)
    B, K, H = batch_size, cfg.num_kv_heads, cfg.head_dim
    slack = _ring_slack(kind, ring_slack)
    slots, ring_slots = _slot_layout(cfg, max_len, kind, rings, slack)
    bufs = lambda tail, d: tuple(jnp.zeros((B, K, s, *tail), d) for s in slots)  # noqa: E731
    return KVCache(
        keys=bufs((H,), dt), values=bufs((H,), dt),
        lengths=jnp.zeros((B,), jnp.int32),
        key_scales=bufs((), jnp.float32) if kind == "int8" else (),
        value_scales=bufs((), jnp.float32) if kind == "int8" else (),
        slot_pos=jnp.full((B, ring_slots), -1, jnp.int32) if ring_slots else None,
        kind=kind, num_sinks=sinks, rings=rings, slack=slack)
