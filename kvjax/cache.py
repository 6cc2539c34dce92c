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
  kivi    KIVI (Liu et al. 2024), kvjax/kivi.py: keys quantised per channel over groups of
          `group_size` tokens, values per token over groups of channels, 2 or 4 bits packed
          into uint8 (`keys`/`values` hold the codes); the last tokens stay in full
          precision in a residual until a block of `residual_length` fills. Scales, minima
          and the residual live in `extras`; `quant` = (bits, group_size, residual_length).
  sinks   StreamingLLM: slots [0, num_sinks) keep the first tokens forever, the other
          S - num_sinks slots are a ring of recent tokens. Keys are stored *before*
          rotation; attention assigns rotary positions by place in the cache (see
          attention.py), as the StreamingLLM paper found necessary for stable perplexity.

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

KINDS = ("dense", "int8", "window", "sinks", "kivi")
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

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """Number of slots S of the full layers (for window/sinks, and a hybrid cache whose
        layers are all rings, the ring: not a limit on tokens)."""
        if self.rings:
            return max(k.shape[2] for k in self.keys)
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
        becomes a ring (slot_pos set), a full layer a plain dense/int8 cache."""
        ring = bool(self.rings) and self.rings[layer] > 0
        one = lambda t: (t[layer],) if t else ()  # noqa: E731
        return self.replace(keys=one(self.keys), values=one(self.values), key_scales=one(self.key_scales),
                            value_scales=one(self.value_scales), slot_pos=self.slot_pos if ring else None,
                            rings=())

    @property
    def nbytes(self) -> int:
        """Exact bytes of every array this cache holds (buffers, scales, positions, lengths)."""
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    KVCache, data_fields=["keys", "values", "lengths", "key_scales", "value_scales", "slot_pos",
                          "head_pos", "head_fill", "head_owner", "extras", "page_table"],
    meta_fields=["kind", "num_sinks", "quant", "rings"])


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


def _sinks_for(kind: str, num_sinks) -> int:
    return (DEFAULT_SINKS if num_sinks is None else int(num_sinks)) if kind == "sinks" else 0


def _quant(kind: str, bits, group_size, residual_length) -> tuple:
    if kind != "kivi":
        if (bits, group_size, residual_length) != (None, None, None):
            raise ValueError(f"bits/group_size/residual_length are KIVI settings; kind is {kind!r}")
        return ()
    q = {"bits": bits, "group_size": group_size, "residual_length": residual_length}
    return tuple(KIVI_DEFAULTS[k] if v is None else int(v) for k, v in q.items())


def layer_rings(cfg: ModelConfig, max_len: int, kind: str = "dense", hybrid: bool | None = None) -> tuple:
    """Per-layer ring sizes of the cache `init_cache` makes (() when it is not hybrid).

    hybrid None (default): a ring of W slots on every layer whose window W is shorter than
    max_len, for dense and int8 caches; False: max_len slots on every layer; True: as None,
    but raise when no layer can have a ring (so a request for savings never silently gets none).
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
        rings = tuple(w if (w := cfg.layer_window(i)) is not None and w < max_len else 0
                      for i in range(cfg.num_layers))
        if any(rings):
            return rings
        reason = (f"no layer of {cfg.name!r} has a window shorter than max_len={max_len} "
                  f"(windows: {[cfg.layer_window(i) for i in range(cfg.num_layers)]})")
    if hybrid:
        raise ValueError(f"hybrid=True: {reason}")
    return ()


def _slot_layout(cfg: ModelConfig, max_len: int, kind: str, rings: tuple) -> tuple[list, int]:
    """(slots of each layer's buffers, slots of `slot_pos` (0: none)) for init_cache and cache_bytes."""
    slots = [r or max_len for r in rings] if rings else [max_len] * cfg.num_layers
    ring_slots = max(rings) if rings else (max_len if kind in ("window", "sinks") else 0)
    return slots, ring_slots


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, kind: str = "dense",
                num_sinks: int | None = None, pressed: bool = False, pooled: bool = False,
                bits: int | None = None,
                group_size: int | None = None, residual_length: int | None = None,
                hybrid: bool | None = None) -> int:
    """Bytes `init_cache` allocates for these arguments, computed without allocating.

    pressed: the same cache once a press has compacted it (it adds per-head slot positions
    int32 [B, K, S] and fills int32 [B, K] per layer; kvjax.press.cache_bytes gives
    per-layer sizes). pooled: once AdaKVPress has pooled it (a head id per slot too)."""
    _check(batch_size, max_len, kind, _sinks_for(kind, num_sinks))
    quant = _quant(kind, bits, group_size, residual_length)
    if kind == "kivi":
        from . import kivi
        per = kivi.layer_bytes(batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, *quant,
                               _resolve_dtype(cfg, dtype))
        return cfg.num_layers * per + 4 * batch_size
    if pooled:
        return (cache_bytes(cfg, batch_size, max_len, dtype, kind, pressed=True)
                + cfg.num_layers * batch_size * cfg.num_kv_heads * max_len * 4)
    if pressed:
        if kind not in ("dense", "int8"):
            raise ValueError(f"only dense and int8 caches can be pressed, got kind {kind!r}")
        per_head = batch_size * cfg.num_kv_heads * 4
        return (cache_bytes(cfg, batch_size, max_len, dtype, kind, hybrid=False)   # never hybrid
                + cfg.num_layers * per_head * (max_len + 1))
    slots, ring_slots = _slot_layout(cfg, max_len, kind, layer_rings(cfg, max_len, kind, hybrid))

    def per_layer(slots):
        values = batch_size * cfg.num_kv_heads * slots * cfg.head_dim
        n = 2 * values * (1 if kind == "int8" else _resolve_dtype(cfg, dtype).itemsize)
        if kind == "int8":
            n += 2 * batch_size * cfg.num_kv_heads * slots * 4            # float32 scales
        return n

    # buffers, slot positions of a ring (window/sinks, or a hybrid cache's ring layers), lengths
    return sum(per_layer(n) for n in slots) + batch_size * ring_slots * 4 + 4 * batch_size


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, mesh=None,
               kind: str = "dense", num_sinks: int | None = None, bits: int | None = None,
               group_size: int | None = None, residual_length: int | None = None,
               hybrid: bool | None = None) -> KVCache:
    """An empty cache of `max_len` slots per row.

    hybrid: on a model with windowed layers (layer_types / sliding_window), a dense or int8
    cache keeps only a ring of `window` slots on each windowed layer by default (see
    `layer_rings`); hybrid=False allocates max_len slots on every layer.

    dtype: storage dtype of dense/window/sinks buffers (default `cfg.dtype`; int8 ignores it).
    kind: "dense" | "int8" | "window" | "sinks" | "kivi"; num_sinks: sink slots for "sinks"
    (default 4); bits (2 or 4), group_size (32), residual_length (128): KIVI settings, with
    max_len a multiple of residual_length.
    mesh: create the buffers directly in their sharded layout (see sharding.py).
    """
    sinks = _sinks_for(kind, num_sinks)
    _check(batch_size, max_len, kind, sinks)
    quant = _quant(kind, bits, group_size, residual_length)
    if kind == "kivi":
        if mesh is not None:
            raise ValueError("a kivi cache cannot be sharded yet; create it without a mesh")
        from . import kivi
        dt = _resolve_dtype(cfg, dtype)
        layers = [kivi.init_layer(batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, *quant, dt)
                  for _ in range(cfg.num_layers)]
        return KVCache(keys=tuple(l.pop("k_codes") for l in layers),
                       values=tuple(l.pop("v_codes") for l in layers),
                       lengths=jnp.zeros((batch_size,), jnp.int32), extras=tuple(layers),
                       kind="kivi", quant=quant)
    rings = layer_rings(cfg, max_len, kind, hybrid)
    if mesh is not None:
        from .sharding import init_sharded_cache  # sharding imports this module
        return init_sharded_cache(cfg, batch_size, max_len, mesh, dtype, kind, sinks, rings)
    dt = jnp.int8 if kind == "int8" else _resolve_dtype(cfg, dtype)
    B, K, H = batch_size, cfg.num_kv_heads, cfg.head_dim
    slots, ring_slots = _slot_layout(cfg, max_len, kind, rings)
    bufs = lambda tail, d: tuple(jnp.zeros((B, K, s, *tail), d) for s in slots)  # noqa: E731
    return KVCache(
        keys=bufs((H,), dt), values=bufs((H,), dt),
        lengths=jnp.zeros((B,), jnp.int32),
        key_scales=bufs((), jnp.float32) if kind == "int8" else (),
        value_scales=bufs((), jnp.float32) if kind == "int8" else (),
        slot_pos=jnp.full((B, ring_slots), -1, jnp.int32) if ring_slots else None,
        kind=kind, num_sinks=sinks, rings=rings)


# ----------------------------------------------------------------------------- traced helpers

def chunk_slots(cache: KVCache, starts: jax.Array, lengths: jax.Array, T: int) -> jax.Array:
    """Slot for each token of a right-padded chunk [B, T] appended at `starts`; S = not written.

    Padding is never written. In a ring, a chunk longer than the ring would hit a slot more
    than once (a scatter with duplicate indices has no defined winner), so only the last
    ring-size real tokens of the chunk are written: the earlier ones would be overwritten anyway.
    A hybrid cache gets a pair (slots of its full layers, slots of its ring layers).
    """
    if cache.hybrid:
        full = next((i for i, r in enumerate(cache.rings) if not r), None)
        return (None if full is None else chunk_slots(cache.layer_view(full), starts, lengths, T),
                chunk_slots(cache.ring_view(), starts, lengths, T))
    S, s = cache.max_len, cache.num_sinks
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = starts[:, None] + t                                           # [B, T]
    end = (starts + lengths)[:, None]
    keep = t < lengths[:, None]
    if cache.kind == "window" or (cache.slot_pos is not None and cache.kind != "sinks"):
        slot = pos % S
        keep = keep & (pos >= end - S)
    elif cache.kind == "sinks":
        ring = S - s
        slot = jnp.where(pos < s, pos, s + (pos - s) % ring)
        keep = keep & ((pos < s) | (pos >= end - ring))
    else:
        slot = pos
    return jnp.where(keep, slot, S)


def _scatter_rows(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] <- new [B, T, K, ...] at slots [B, T] (slot S is dropped).

    vmap over rows (rather than one scatter indexed by (row, slot)) makes the batch a
    batching dimension of the scatter, so a batch-sharded cache updates shard-locally.
    """
    def row(b, n, sl):  # [K, S, ...], [T, K, ...], [T]
        return b.at[:, sl].set(jnp.swapaxes(n, 0, 1).astype(b.dtype), mode="drop")

    return jax.vmap(row)(buf, new, slots)


def quantize_int8(x: jax.Array):
    """Absmax int8 over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def layer_arrays(cache: KVCache, layer: int) -> dict:
    """One layer's stored arrays: k, v (and int8 scales ks, vs); kivi: kvjax.kivi's names."""
    if cache.kind == "kivi":
        return {"k_codes": cache.keys[layer], "v_codes": cache.values[layer], **cache.extras[layer]}
    arrays = {"k": cache.keys[layer], "v": cache.values[layer]}
    if cache.kind == "int8":
        arrays.update(ks=cache.key_scales[layer], vs=cache.value_scales[layer])
    return arrays


def read_layer(kind: str, arrays: dict, dtype):
    """(keys, values) [B, K, S, H] in `dtype` from one layer's arrays (int8 is dequantised here)."""
    k, v = arrays["k"], arrays["v"]
    if kind == "int8":
        k = (k.astype(jnp.float32) * arrays["ks"][..., None]).astype(dtype)
        v = (v.astype(jnp.float32) * arrays["vs"][..., None]).astype(dtype)
    return k, v


def write_layer(cache: KVCache, layer: int, k_new, v_new, slots) -> dict:
    """One layer's arrays after writing a chunk's k/v [B, T, K, H] at `slots` [B, T]."""
    if cache.kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
        new = {"k": kq, "v": vq, "ks": ks, "vs": vs}
    else:
        new = {"k": k_new, "v": v_new}
    return {name: _scatter_rows(old, new[name], slots) for name, old in layer_arrays(cache, layer).items()}


def slot_positions(cache: KVCache, starts, lengths=None, slots=None):
    """(position held by each slot [B, S], slot valid [B, S]).

    Before a chunk is appended (lengths None), or after it is written at `slots`.
    """
    B, S = cache.batch_size, cache.max_len
    if cache.slot_pos is None:   # dense and int8: slot s holds position s
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
        end = starts if lengths is None else starts + lengths
        return pos, pos < end[:, None]
    pos = cache.slot_pos
    if lengths is not None:
        T = slots.shape[1]
        chunk = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        pos = jax.vmap(lambda p, sl, n: p.at[sl].set(n, mode="drop"))(pos, slots, chunk)
    return pos, pos >= 0


def assemble(cache: KVCache, layers: list, starts, lengths, slots) -> KVCache:
    """The cache after a chunk: new per-layer arrays, lengths and slot positions."""
    if cache.kind == "kivi":
        rest = tuple({k: v for k, v in l.items() if k not in ("k_codes", "v_codes")} for l in layers)
        return cache.replace(keys=tuple(l["k_codes"] for l in layers),
                             values=tuple(l["v_codes"] for l in layers), extras=rest,
                             lengths=starts + lengths)
    changes = dict(keys=tuple(l["k"] for l in layers), values=tuple(l["v"] for l in layers),
                   lengths=starts + lengths)
    if cache.kind == "int8":
        changes.update(key_scales=tuple(l["ks"] for l in layers),
                       value_scales=tuple(l["vs"] for l in layers))
    if cache.hybrid:
        changes["slot_pos"] = slot_positions(cache.ring_view(), starts, lengths, slots[1])[0]
    elif cache.slot_pos is not None:
        changes["slot_pos"] = slot_positions(cache, starts, lengths, slots)[0]
    return cache.replace(**changes)


# ----------------------------------------------------------------------------- pressed caches

def as_pressed(cache: KVCache) -> KVCache:
    """A dense/int8 cache in the pressed layout (traced): slot s of every head holds position s."""
    if cache.pressed:
        return cache
    if cache.hybrid:   # host checks refuse this first (kvjax/press/host.py)
        raise ValueError("a hybrid cache cannot be pressed; make it with init_cache(..., hybrid=False)")
    pos, fill = [], []
    for layer in range(len(cache.keys)):
        B, K, S = cache.keys[layer].shape[:3]
        s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        used = cache.lengths[:, None, None]
        pos.append(jnp.where(s < used, s, -1) * jnp.ones((B, K, 1), jnp.int32))
        fill.append(jnp.broadcast_to(jnp.minimum(cache.lengths, S)[:, None], (B, K)).astype(jnp.int32))
    return cache.replace(head_pos=tuple(pos), head_fill=tuple(fill))


def as_pooled(cache: KVCache) -> KVCache:
    """An EMPTY dense/int8 cache as one pool of K * S slots per layer (traced; a reshape)."""
    if cache.pooled:
        return cache
    keys, values, ks, vs, pos, owner, fill = [], [], [], [], [], [], []
    for layer in range(len(cache.keys)):
        B, K, S, H = cache.keys[layer].shape
        keys.append(cache.keys[layer].reshape(B, 1, K * S, H))
        values.append(cache.values[layer].reshape(B, 1, K * S, H))
        if cache.kind == "int8":
            ks.append(cache.key_scales[layer].reshape(B, 1, K * S))
            vs.append(cache.value_scales[layer].reshape(B, 1, K * S))
        pos.append(jnp.full((B, 1, K * S), -1, jnp.int32))
        owner.append(jnp.full((B, K * S), -1, jnp.int32))
        fill.append(jnp.zeros((B, K), jnp.int32))          # per head; the pool's fill is the sum
    return cache.replace(keys=tuple(keys), values=tuple(values), key_scales=tuple(ks),
                         value_scales=tuple(vs), head_pos=tuple(pos), head_owner=tuple(owner),
                         head_fill=tuple(fill))


def _scatter_heads(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] <- new [B, T, K, ...] at per-head slots [B, K, T] (slot S is dropped)."""
    def one(b, n, sl):  # [S, ...], [T, ...], [T]
        return b.at[sl].set(n.astype(b.dtype), mode="drop")

    per_head = jax.vmap(one, in_axes=(0, 1, 0))           # over K: new is [T, K, ...]
    return jax.vmap(per_head)(buf, new, slots)


def write_layer_heads(cache: KVCache, layer: int, k_new, v_new, slots) -> dict:
    """One layer's arrays after writing k/v [B, T, K, H] at per-head `slots` [B, K, T]."""
    if cache.kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
        new = {"k": kq, "v": vq, "ks": ks, "vs": vs}
    else:
        new = {"k": k_new, "v": v_new}
    return {name: _scatter_heads(old, new[name], slots) for name, old in layer_arrays(cache, layer).items()}


def gather_layer_heads(cache: KVCache, layer: int, order) -> dict:
    """One layer's arrays reordered per head: slot j of head (b, k) takes old slot order[b, k, j]."""
    def take(a):
        idx = order if a.ndim == 3 else order[..., None]
        return jnp.take_along_axis(a, idx, axis=2)
    return {name: take(a) for name, a in layer_arrays(cache, layer).items()}


def assemble_pressed(cache: KVCache, layers: list, head_pos: list, head_fill: list, lengths) -> KVCache:
    """The pressed cache made of new per-layer arrays, per-head positions and fills."""
    changes = dict(keys=tuple(l["k"] for l in layers), values=tuple(l["v"] for l in layers),
                   lengths=lengths, head_pos=tuple(head_pos), head_fill=tuple(head_fill))
    if cache.pooled:
        changes["head_owner"] = tuple(l["owner"] for l in layers)
    if cache.kind == "int8":
        changes.update(key_scales=tuple(l["ks"] for l in layers),
                       value_scales=tuple(l["vs"] for l in layers))
    return cache.replace(**changes)
