"""One prefill of a context, every press applied to it: the shared path of press benchmarks.

Axis letters: B batch, T context width, N query heads, K kv heads, H head dim, L layers.

In kvpress's semantics (and `kvjax.prefill(..., press=p)`'s) a press only decides what each
layer keeps: the prefill that scores it attends over the whole uncompressed chunk in every
layer, so the queries, keys, values and attention a layer hands the press are the same
whatever the press. `capture` runs that prefill once and keeps, per layer, what presses
read (`press.base.LayerInputs` without the attention input `x`, which only KVzip's own
passes use); `apply_press` then gives, for any press and ratio, the pressed cache and the
kept positions `prefill(..., press=p)` would give, without prefilling again:

    pre = capture(cfg, params, tokens, lengths)              # one model pass
    for press in presses:
        cache = apply_press(cfg, pre, press, kvjax.press.init_cache(cfg, B, T, press))
        # pre.logits: the context's last-token logits (the same for every press)

Each press's apply program is compiled once per (press without its ratio, shapes): a new
ratio is new budgets (data), as in `prefill`. Memory: `capture` holds q and rotated q
[B, T, N, H] and k, v [B, T, K, H] per layer (SmolLM2 at 4k tokens: ~25 MB per layer and
row), plus, with attention=True, each layer's [B, N, T] attention sums; the capture itself
materialises one layer's [B, N, T, T] scores at a time, as a pressed prefill does.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import validate
from ..cache import KVCache, as_pooled, as_pressed
from ..cache.dense import chunk_slots, write_layer
from ..cache.pressed import assemble_chunk, keep_all, write_chunk
from ..config import ModelConfig
from ..press import host, pressed_cache
from ..press.base import LayerInputs, Press
from ..press.decoding import DecodingPress
from .programs import append_chunk


class Prefilled(NamedTuple):
    """What every press reads from one prefill of a context (a pytree of arrays)."""
    logits: jax.Array      # float32 [B, V]: each row's last real token
    positions: jax.Array   # int32 [B, T]
    lengths: jax.Array     # int32 [B]
    layers: tuple          # per layer: dict q, q_rot [B,T,N,H], k, v [B,T,K,H], inv_freq,
    #                        o_kernel [N*H, D], attn_sums float32 [B, N, T] (or None)

    @property
    def attention(self) -> bool:
        """Whether the attention sums were kept (presses with needs_attention read them)."""
        return self.layers[0]["attn_sums"] is not None


class _Recorder:
    """A press-shaped hook for the capture pass: records what each layer hands a press and
    keeps every token (the scratch cache it fills is discarded)."""
    pooled = False

    def __init__(self, attention: bool):
        self.needs_attention = attention
        self.out = []

    def keep(self, inp: LayerInputs):
        self.out.append({"q": inp.q, "q_rot": inp.q_rot, "k": inp.k, "v": inp.v, "inv_freq": inp.inv_freq,
                         "o_kernel": inp.o_kernel, "attn_sums": inp.attn_sums})
        return keep_all(inp.k, inp.lengths)


def capture(cfg: ModelConfig, params, tokens, lengths, attention: bool = True) -> Prefilled:
    """Prefill tokens [B, T] (right-padded, lengths [B]) from position 0 once, keeping what
    presses read. attention=False skips the attention sums (only ObservedAttention and
    wrappers of it read them) and their [B, N, T, T] probabilities' column sums."""
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_room(cfg, np.zeros_like(lens), lens, 1 << 62, "capture", bounded=False)
    # an argument, not a constant built inside the program: XLA would constant-fold the scores
    # against an empty constant cache (slow compiles); one slot per layer, which the pass discards
    scratch = pressed_cache(cfg, tok.shape[0], [1] * cfg.num_layers, jnp.dtype(cfg.dtype))
    return capture_program(cfg, params, jnp.asarray(tok, jnp.int32), jnp.asarray(lens, jnp.int32),
                           scratch, bool(attention))


@partial(jax.jit, static_argnums=(0, 5))
def capture_program(cfg: ModelConfig, params, tokens, lengths, scratch: KVCache, attention: bool) -> Prefilled:
    B, T = tokens.shape
    rec = _Recorder(attention)
    logits, _ = append_chunk(cfg, params, tokens, lengths, scratch, press=rec)
    assert len(rec.out) == cfg.num_layers, "the capture pass did not reach every layer"
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    return Prefilled(logits, positions, lengths, tuple(rec.out))


def apply_press(cfg: ModelConfig, pre: Prefilled, press: Press | None, cache: KVCache) -> KVCache:
    """The cache `prefill(cfg, params, tokens, lengths, cache, press=press)` would return, from
    the captured prefill `pre`: per layer the press's decision on the captured inputs, the
    kept tokens written into the EMPTY dense/int8 (or pooled, for AdaKV) `cache` (donated).
    press=None keeps every token (the dense cache in the pressed layout)."""
    where = "apply_press"
    lens = np.asarray(pre.lengths)
    if press is not None:
        if getattr(press, "whole_model", False) or isinstance(press, DecodingPress):
            raise ValueError(f"{where}: {type(press).__name__} runs model passes of its own; "
                             f"use kvjax.prefill(..., press=...) for it")
        host.check_press(press, cfg, cache, None, where)
        if press.needs_attention and not pre.attention:
            raise ValueError(f"{where}: {type(press).__name__} reads attention sums; capture(..., "
                             f"attention=True) keeps them")
    if (np.asarray(cache.lengths) > 0).any() or (
            cache.pressed and any((np.asarray(f) > 0).any() for f in cache.head_fill)):
        raise ValueError(f"{where}: the captured context starts at position 0, so the cache must be "
                         f"empty; this one already holds tokens")
    if cache.batch_size != lens.shape[0]:
        raise ValueError(f"{where}: the cache has batch size {cache.batch_size} but the captured "
                         f"context has {lens.shape[0]} rows")
    if press is None:
        host.check_room(cache, lens, where)
        return apply_program(cfg, pre, None, None, cache)
    budgets = host.prefill_budgets(press, cfg, cache, lens, where)
    return apply_program(cfg, pre, press.static(), {k: jnp.asarray(v) for k, v in budgets.items()}, cache)


@partial(jax.jit, static_argnums=(0, 2), donate_argnums=(4,))
def apply_program(cfg: ModelConfig, pre: Prefilled, press, budgets, cache: KVCache) -> KVCache:
    """append_chunk's pressed write (programs.append_chunk -> cache/pressed.attend -> write_chunk)
    with the layer inputs taken from `pre` instead of a model pass. A pressed hybrid cache's
    ring layers take the context as a prefill writes them (their last window of tokens)."""
    cache = as_pooled(cache) if getattr(press, "pooled", False) else as_pressed(cache)
    B, T = pre.positions.shape
    slots = chunk_slots(cache, cache.lengths, pre.lengths, T) if cache.hybrid else None
    layers = []
    for layer, d in enumerate(pre.layers):
        if cache.hybrid and cache.ring_layer(layer):
            layers.append(write_layer(cache.layer_view(layer), 0, d["k"], d["v"], slots[1]))
            continue
        if press is None:
            keep = keep_all(d["k"], pre.lengths)
        else:
            inp = LayerInputs(cfg=cfg, layer=layer, x=None, q=d["q"], q_rot=d["q_rot"], k=d["k"], v=d["v"],
                              positions=pre.positions, lengths=pre.lengths, inv_freq=d["inv_freq"],
                              o_kernel=d["o_kernel"], attn_sums=d["attn_sums"],
                              budget={k: v[layer] for k, v in budgets.items()})
            keep = press.keep(inp)
        view, at = (cache.layer_view(layer), 0) if cache.hybrid else (cache, layer)
        layers.append(write_chunk(view, at, d["k"], d["v"], pre.positions, keep))
    return assemble_chunk(cache, layers, cache.lengths, pre.lengths, slots)
