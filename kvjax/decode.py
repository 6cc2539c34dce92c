"""The jit boundary: forward, prefill, decode_step, generate, and the no-cache baseline.

Axis letters: B batch, T chunk length, S cache slots, V vocab, N new tokens.

Each public function validates its inputs on the host (validate.py), then calls one
jitted implementation with the config static and the cache donated, so XLA writes new
K/V into the cache's own memory. Sampling parameters are traced arrays: changing them
never recompiles. `generate` runs prefill and the whole decode loop (`lax.scan`) inside
one jit.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import cache as cache_layouts, sharding, validate
from .cache import KVCache, as_pooled, as_pressed, assemble, assemble_pressed, chunk_slots, init_cache
from .config import ModelConfig
from .model import Transformer, init_params
from .sampling import sample


class GenerateOutput(NamedTuple):
    tokens: jax.Array   # int32 [B, N]: new tokens; after a row's EOS, pad_token_id
    lengths: jax.Array  # int32 [B]: tokens generated per row, EOS included
    cache: KVCache | None  # prompt + every generated token (None for use_cache=False)


# ----------------------------------------------------------------------------- traced cores

def _append(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, live: int | None = None,
            press=None, budgets=None):
    """Append a right-padded chunk [B, T] at each row's cache length; logits of its last real token.

    live (static): attention reads only slots [0, live); every row's tokens must end there.
    press (static) / budgets (int32 [L, B, ...]): compact the chunk as it enters (kvjax/press/);
    a pressed cache keeps per-head slot positions from then on.
    """
    T = tokens.shape[1]
    if press is not None:
        cache = as_pooled(cache) if getattr(press, "pooled", False) else as_pressed(cache)
    starts = cache.lengths
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]   # [B, T]
    slots = None if cache.pressed else chunk_slots(cache, starts, lengths, T)
    logits, layers = Transformer(cfg).apply(
        {"params": params}, tokens, positions, lengths, cache, starts, slots,
        logits_at=jnp.maximum(lengths - 1, 0), live=live, press=press, budgets=budgets)
    if cache.pressed:
        nxt = layers[0].get("next", starts + lengths)
        new = assemble_pressed(cache, layers, [l["pos"] for l in layers], [l["fill"] for l in layers], nxt)
        return logits[:, 0], new
    return logits[:, 0], assemble(cache, layers, starts, lengths, slots)     # [B, V]


def _decode(cfg: ModelConfig, params, tokens, cache: KVCache, active, live=None):
    """One token per row [B]; rows with active=False write nothing and keep their length."""
    return _append(cfg, params, tokens[:, None], active.astype(jnp.int32), cache, live)


def _forward(cfg: ModelConfig, params, tokens, lengths, logits_at=None):
    T = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, lengths,
                                       logits_at=logits_at)
    return logits


def _decode_all(cfg: ModelConfig, params, tokens, cache: KVCache, live=None):
    return _decode(cfg, params, tokens, cache, jnp.ones(tokens.shape, bool), live)


# Attention reads a power-of-two prefix of the cache that covers every row's live tokens
# (at least MIN_LIVE slots), so a step's cost follows the live context, not max_len.
MIN_LIVE = 128
# Longest-row lengths are rounded up to this before planning, so prompts whose lengths
# differ within one band share a compiled program.
LIVE_BAND = 64


def live_bucket(n: int, max_len: int) -> int:
    """Slots attention reads when the longest row holds n tokens."""
    return min(max(MIN_LIVE, 1 << max(n - 1, 0).bit_length()), max_len)


def live_plan(end_of_prompt: int, max_new_tokens: int, cache: KVCache, decoding=None, prompt_width: int = 1):
    """(prefill live, ((steps, live, compress, repeat), ...)) for a generate whose longest row
    holds `end_of_prompt` tokens after the prompt.

    Ring and pressed caches always read all their slots (live None). `decoding`: a
    DecodingPress, whose compressions fall on steps fixed by its interval (see
    `decoding_segments`).
    """
    S = cache.max_len
    if decoding is not None:
        return None, decoding_segments(max_new_tokens, decoding, prompt_width)
    if not cache.reads_live_prefix:
        return None, ((max_new_tokens, None, False, 1),)
    start = min(-(-end_of_prompt // LIVE_BAND) * LIVE_BAND, S)
    segments = []
    for i in range(max_new_tokens):        # step i writes a token at position <= start + i
        live = live_bucket(start + i + 1, S)
        if segments and segments[-1][1] == live:
            segments[-1][0] += 1
        else:
            segments.append([1, live])
    return live_bucket(start, S), tuple((n, live, False, 1) for n, live in segments)


def decoding_segments(max_new_tokens: int, press, prompt_width: int):
    """kvpress's DecodingPress schedule as static segments (steps, None, compress after, repeat).

    The prefill counts as step 1 (compressed right away if the interval is 1 or the chunk is
    at least target_size wide); decode step i is forward i + 2; a compression follows the
    forward that brings the count to the interval, and the count restarts.
    """
    interval = press.compression_interval
    count = 0 if (interval == 1 or prompt_width >= press.target_size) else 1
    first = interval - count                     # decode steps until the first compression
    out, left = [], max_new_tokens
    if left < first:                         # the count never reaches the interval
        return ((left, None, False, 1),) if left else ()
    out.append((first, None, True, 1))       # the step that reaches it compresses, also the last
    left -= first
    periods, tail = divmod(left, interval)
    if periods:
        out.append((interval, None, True, periods))
    if tail:
        out.append((tail, None, False, 1))
    return tuple(out)


def prefill_compresses(press, prompt_width: int) -> bool:
    return press.compression_interval == 1 or prompt_width >= press.target_size


def _decode_loop(cfg, params, logits, cache, segments, knobs, decoding=None):
    """Steps of (sample, decode) in `lax.scan`s: the decode program of `generate`.

    segments (static): ((steps, live, compress, repeat), ...): one scan per segment, each
    reading only the cache prefix its tokens can reach (live; None reads every slot); a
    segment with repeat r > 1 is an outer scan of r periods, each `steps` steps followed by
    a DecodingPress compaction when `compress`. Step i samples token i from the current
    logits, then decodes it, so the returned cache holds every generated token (ready for
    the next prefill of a conversation). Returns (GenerateOutput, logits after the last step).
    """
    done = jnp.zeros(logits.shape[:1], bool)
    toks, actives, first = [], [], 0
    for steps, live, compress, repeat in segments:
        def step(carry, i, live=live):
            logits, cache, done = carry
            tok, active, done = _pick(logits, i, done, knobs)
            logits, cache = _decode(cfg, params, tok, cache, active, live)
            return (logits, cache, done), (tok, active)

        def period(carry, i0, steps=steps, step=step, compress=compress):
            carry, out = jax.lax.scan(step, carry, i0 + jnp.arange(steps, dtype=jnp.int32))
            if compress:
                logits, cache, done = carry
                carry = (logits, _compress(cache, decoding), done)
            return carry, out

        carry = (logits, cache, done)
        if repeat == 1:
            carry, (tok, active) = period(carry, jnp.int32(first))
        else:
            carry, (tok, active) = jax.lax.scan(
                period, carry, first + steps * jnp.arange(repeat, dtype=jnp.int32))
            tok, active = tok.reshape(-1, tok.shape[-1]), active.reshape(-1, active.shape[-1])
        logits, cache, done = carry
        toks.append(tok)
        actives.append(active)
        first += steps * repeat
    if not toks:
        B = logits.shape[0]
        toks, actives = [jnp.zeros((0, B), jnp.int32)], [jnp.zeros((0, B), bool)]
    toks, active = jnp.concatenate(toks, 0), jnp.concatenate(actives, 0)
    return GenerateOutput(toks.T, active.sum(0, dtype=jnp.int32), cache), logits


def _compress(cache, decoding):
    from .press.decoding import compress_cache
    return compress_cache(cache, decoding)


def _generate_impl(cfg, params, prompts, prompt_lengths, cache, plan, knobs):
    """Prefill, then the decode loop (`_decode_loop`), all in one jit.

    plan (static): (prefill live, segments, prompt press, decoding press), see `live_plan`;
    knobs["budgets"]: the prompt press's budgets (traced).
    """
    prefill_live, segments, press, decoding = plan
    if decoding is not None:
        cache = as_pressed(cache)
    logits, cache = _append(cfg, params, prompts, prompt_lengths, cache, prefill_live, press,
                            knobs.get("budgets"))
    if decoding is not None and prefill_compresses(decoding, prompts.shape[1]):
        cache = _compress(cache, decoding)
    return _decode_loop(cfg, params, logits, cache, segments, knobs, decoding)[0]


_forward_jit = jax.jit(_forward, static_argnums=0)
_prefill_jit = jax.jit(_append, static_argnums=(0, 5, 6), donate_argnums=4)
_decode_jit = jax.jit(_decode_all, static_argnums=(0, 4), donate_argnums=3)
_generate_cached = jax.jit(_generate_impl, static_argnums=(0, 5), donate_argnums=4)
# generate's decode loop on its own (benchmarks time it on a cache prefilled outside the timed region)
_decode_loop_jit = jax.jit(_decode_loop, static_argnums=(0, 4, 6), donate_argnums=3)


@lru_cache(maxsize=None)
def _mesh_jits(cfg: ModelConfig, mesh, kind: str = "dense", num_sinks: int = 0, layout_in: str = "plain",
               layout_out: str | None = None, budgets: bool = False, rings: tuple = ()):
    """The same three programs with explicit in/out shardings (pjit) for caches on `mesh`.

    Pinning the output cache to the input cache's sharding keeps it laid out the same way
    across steps: batch over data, kv heads over model (see sharding.py). A press changes
    the layout (plain -> pressed or pooled): layout_in / layout_out say which; budgets: the
    press's host-computed budgets come along (replicated).
    """
    params_shape = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ps = sharding.param_shardings(cfg, params_shape, mesh)
    cs = cache_layouts.cache_shardings(cfg, mesh, kind, num_sinks, layout_in, rings)
    out = cache_layouts.cache_shardings(cfg, mesh, kind, num_sinks, layout_out or layout_in, rings)
    b1, b2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
    rep = sharding.replicated(mesh)
    knobs = {"temperature": b1, "top_k": b1, "top_p": b1, "eos": rep, "pad": rep, "key": rep}
    if budgets:
        knobs["budgets"] = rep
    return {
        "prefill": jax.jit(_append, static_argnums=(0, 5, 6), donate_argnums=4,
                           in_shardings=(ps, b2, b1, cs, rep), out_shardings=(b2, out)),
        "decode": jax.jit(_decode_all, static_argnums=(0, 4), donate_argnums=3,
                          in_shardings=(ps, b1, cs), out_shardings=(b2, cs)),
        "generate": jax.jit(_generate_impl, static_argnums=(0, 5), donate_argnums=4,
                            in_shardings=(ps, b2, b1, cs, knobs),
                            out_shardings=GenerateOutput(b2, b1, out)),
    }


def _out_layout(cache: KVCache, press) -> str:
    if cache.pooled or getattr(press, "pooled", False):
        return "pooled"
    return "pressed" if (cache.pressed or press is not None) else "plain"


def _global_budgets(mesh, budgets):
    if budgets is None:
        return None
    if mesh is None:
        return jax.tree.map(jnp.asarray, budgets)
    return jax.tree.map(lambda a: sharding.to_global(np.asarray(a), sharding.replicated(mesh)), budgets)


def _placed(mesh, *host_arrays):
    """Host inputs as global arrays split by rows over the mesh (or device arrays without one)."""
    if mesh is None:
        return tuple(jnp.asarray(a) for a in host_arrays)
    return tuple(sharding.to_global(a, sharding.batch_sharding(mesh, np.ndim(a))) for a in host_arrays)


def _pick(logits, i, done, knobs):
    """Sample token i for rows not yet done; returns (tokens, active, new done)."""
    tok = sample(logits, jax.random.fold_in(knobs["key"], i), knobs["temperature"],
                 knobs["top_k"], knobs["top_p"])
    active = ~done
    tok = jnp.where(active, tok, knobs["pad"])
    is_eos = (tok[:, None] == knobs["eos"][None, :]).any(axis=-1)   # eos: int32 [E], -1 padded
    return tok, active, done | (active & is_eos)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _nocache_step(cfg, width, params, buf, cur, done, i, knobs):
    """Re-run the model over each row's whole prefix buf[:, :cur] and append one token.

    `width` (static) is the bucketed prefix length: the cost follows the prefix, not the
    final buffer size, and only one program is compiled per power of two.
    """
    logits = _forward(cfg, params, buf[:, :width], cur, logits_at=cur - 1)[:, 0]
    tok, active, done = _pick(logits, i, done, knobs)
    rows = jnp.arange(buf.shape[0])
    buf = buf.at[rows, cur].set(jnp.where(active, tok, buf[rows, cur]), mode="drop")
    return buf, cur + active.astype(jnp.int32), done, tok, active


# ----------------------------------------------------------------------------- public API

def forward(cfg: ModelConfig, params, tokens, lengths=None) -> jax.Array:
    """Full causal pass without a cache: tokens [B, S] (right-padded) -> logits float32 [B, S, V].

    Logits at padding positions (t >= lengths[b]) are computed but meaningless.
    """
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_token_ids(cfg, tok, lens)
    validate.check_room(cfg, np.zeros_like(lens), lens, tok.shape[1], "forward")
    return _forward_jit(cfg, params, jnp.asarray(tok, jnp.int32), jnp.asarray(lens))


def prefill(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, press=None):
    """Append a right-padded chunk at each row's current cache length.

    tokens: int [B, T]; lengths: int [B], real tokens of this chunk per row (>= 1).
    press: a kvjax.press press: the chunk is scored and only what each kv head keeps is
    written (the cache may be smaller than the chunk). The chunk's own logits are those of
    the full chunk (it attends to all of itself, as in kvpress); later tokens see what was
    kept, at the original positions, and continue at the uncompressed length.
    Returns (logits of each row's last real token, float32 [B, V]; the new cache).
    The input cache is donated: use the returned one.
    """
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_cache(cfg, cache, tok.shape[0])
    validate.check_token_ids(cfg, tok, lens)
    mesh = cache_layouts.mesh_of(cache)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh, tok.shape[0])
    if press is not None and hasattr(press, "prefill"):   # a whole-model press (KVzip): its own passes
        return press.prefill(cfg, params, tok, lens, cache)
    used = sharding.to_host(cache.lengths)
    if press is not None or cache.pressed:
        from .press import host
        if press is not None:
            host.check_press(press, cfg, cache, mesh, "prefill")
            budgets = host.prefill_budgets(press, cfg, cache, lens, "prefill")
            press = press.static()
        else:
            host.check_room(cache, lens * host.per_token(cfg, cache), "prefill")
            budgets = None
        validate.check_room(cfg, used, lens, cache.max_len, "prefill", bounded=False)
        fn = _prefill_jit if mesh is None else _mesh_jits(
            cfg, mesh, cache.kind, cache.num_sinks, cache_layouts.layout_name(cache), _out_layout(cache, press),
            budgets is not None)["prefill"]
        return fn(cfg, params, *_placed(mesh, tok.astype(np.int32), lens), cache, None, press,
                  _global_budgets(mesh, budgets))
    validate.check_room(cfg, used, lens, cache.max_len, "prefill", cache.bounded)
    live = live_bucket(int((used + lens).max()), cache.max_len) if cache.reads_live_prefix else None
    fn = _prefill_jit if mesh is None else _mesh_jits(cfg, mesh, cache.kind, cache.num_sinks,
                                                      rings=cache.rings)["prefill"]
    return fn(cfg, params, *_placed(mesh, tok.astype(np.int32), lens), cache, live, None, None)


def decode_step(cfg: ModelConfig, params, tokens, cache: KVCache, check: bool = True):
    """One new token per row: tokens int [B] -> (logits float32 [B, V], new cache).

    Computes Q/K/V for the new token only and attends over the row's cached prefix.
    `check=False` skips the host checks (token range, free cache slot), which read the
    tokens and cache lengths back from the device and so wait for the previous step.
    """
    live = None       # without the host check the longest row is unknown: read every slot
    if check:
        tok = np.asarray(tokens)
        if tok.ndim != 1:
            raise ValueError(f"decode_step takes one token per row, shape [B]; got shape {tok.shape}")
        validate.check_cache(cfg, cache, tok.shape[0])
        ones = np.ones_like(tok, dtype=np.int32)
        validate.check_token_ids(cfg, validate.as_tokens(tok[:, None]), ones)
        used = sharding.to_host(cache.lengths)
        if cache.pressed:
            from .press import host
            host.check_room(cache, ones * host.per_token(cfg, cache), "decode_step")
            validate.check_room(cfg, used, ones, cache.max_len, "decode_step", bounded=False)
        else:
            validate.check_room(cfg, used, ones, cache.max_len, "decode_step", cache.bounded)
            if cache.reads_live_prefix:
                live = live_bucket(int(used.max()) + 1, cache.max_len)
    mesh = cache_layouts.mesh_of(cache)
    if mesh is None:
        return _decode_jit(cfg, params, jnp.asarray(tokens, jnp.int32), cache, live)
    if not isinstance(tokens, jax.Array) or tokens.is_fully_addressable:
        (tokens,) = _placed(mesh, np.asarray(tokens, np.int32))
    return _mesh_jits(cfg, mesh, cache.kind, cache.num_sinks, cache_layouts.layout_name(cache),
                      rings=cache.rings)["decode"](
        cfg, params, tokens, cache, live)


def generate(cfg: ModelConfig, params, prompt_tokens, prompt_lengths=None, max_new_tokens: int = 32,
             temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, key=None, max_len=None,
             cache: KVCache | None = None, use_cache: bool = True, pad_token_id: int = 0,
             mesh=None, cache_kind: str = "dense", num_sinks: int | None = None,
             press=None, **cache_options) -> GenerateOutput:
    """Generate `max_new_tokens` per row after right-padded prompts [B, S].

    temperature/top_k/top_p: scalars or per-row [B] (temperature 0 = greedy). A row that
    emits an end-of-sequence id stops: its later tokens are `pad_token_id` and its length
    freezes. `eos_token_id`: None, one id, or a sequence of ids (generation_config.json's
    list, e.g. Llama 3's <|end_of_text|> and <|eot_id|>); any of them stops a row.
    `cache`: continue from an existing cache (the prompt is appended after each row's
    history, e.g. the next turn of a conversation); it is donated. Otherwise a cache of
    `max_len` slots (default: prompt width + max_new_tokens) is allocated.
    `use_cache=False` is the honest baseline: every token re-runs the model over its prefix.
    `mesh`: allocate the new cache sharded on this mesh (a given cache keeps its own layout);
    rows are split over "data", heads over "model" (see sharding.py).
    `cache_kind`/`num_sinks`: the kind of a newly allocated cache ("dense", "int8",
    "window", "sinks"; see cache.py). window/sinks caches of `max_len` slots generate past
    max_len by design; dense and int8 raise when prompt + max_new_tokens exceeds it.
    """
    tok = validate.as_tokens(prompt_tokens, "prompt_tokens")
    lens = validate.as_lengths(prompt_lengths, tok, "prompt_lengths")
    validate.check_token_ids(cfg, tok, lens, "prompt_tokens")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    B, S = tok.shape
    knobs = _knobs(cfg, B, temperature, top_k, top_p, eos_token_id, key, pad_token_id)
    if not use_cache:
        if cache is not None:
            raise ValueError("use_cache=False cannot continue from a cache; pass cache=None")
        limit = max_len if max_len is not None else S + max_new_tokens
        validate.check_room(cfg, lens, np.full_like(lens, max_new_tokens), limit, "generate")
        return _generate_nocache(cfg, params, tok, lens, max_new_tokens, knobs)
    if cache is None:
        if mesh is not None:
            sharding.check_mesh(cfg, mesh, B)
        if press is not None:   # presses work on max_len slots per layer, not on rings
            cache_options.setdefault("hybrid", False)
        cache = init_cache(cfg, B, max_len if max_len is not None else S + max_new_tokens, mesh=mesh,
                           kind=cache_kind, num_sinks=num_sinks, **cache_options)
    elif max_len is not None and max_len != cache.max_len:
        raise ValueError(f"max_len={max_len} disagrees with the given cache's max_len={cache.max_len}")
    validate.check_cache(cfg, cache, B)
    mesh = cache_layouts.mesh_of(cache)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh, B)
    used = sharding.to_host(cache.lengths)
    what = f"generate (prompt + max_new_tokens={max_new_tokens})"
    if press is not None or cache.pressed:
        plan, knobs = _pressed_plan(cfg, cache, press, mesh, lens, int(max_new_tokens), S, knobs, what)
        validate.check_room(cfg, used, lens + max_new_tokens, cache.max_len, what, bounded=False)
    else:
        validate.check_room(cfg, used, lens + max_new_tokens, cache.max_len, what, cache.bounded)
        plan = (*live_plan(int((used + lens).max()), int(max_new_tokens), cache), None, None)
    fn = _generate_cached if mesh is None else _mesh_jits(
        cfg, mesh, cache.kind, cache.num_sinks, cache_layouts.layout_name(cache), _out_layout(cache, press),
        "budgets" in knobs, cache.rings)["generate"]
    return fn(cfg, params, *_placed(mesh, tok.astype(np.int32), lens), cache, plan,
              _place_knobs(mesh, knobs))


def _pressed_plan(cfg, cache, press, mesh, lens, N, width, knobs, what):
    """(plan, knobs) for a generate that presses its prompt, runs a DecodingPress, or continues
    a pressed cache; checks the room every layer needs first."""
    from .press import host
    from .press.decoding import DecodingPress

    prompt_press = decoding = None
    knobs = dict(knobs)
    if press is not None:
        host.check_press(press, cfg, cache, mesh, "generate")
    if isinstance(press, DecodingPress):
        decoding = press
        _, segments = live_plan(0, N, cache, decoding, width)
        host.check_decoding_room(cache, press, lens, segments, prefill_compresses(press, width), what)
    else:
        if press is not None:
            knobs["budgets"] = _global_budgets(mesh, host.prefill_budgets(press, cfg, cache, lens, what))
            kept = press.kept_bound(lens, cfg)
            prompt_press = press.static()
            host.check_room(cache, np.asarray(kept) + N * host.per_token(cfg, cache), what,
                            scale=cfg.num_kv_heads if getattr(press, "pooled", False) and not cache.pooled else 1)
        else:
            host.check_room(cache, (lens + N) * host.per_token(cfg, cache), what)
        segments = ((N, None, False, 1),)          # a pressed cache reads all its slots
    return (None, segments, prompt_press, decoding), knobs


EOS_WIDTH = 8   # knobs["eos"] holds up to this many end-of-sequence ids without a new program


def eos_ids(eos_token_id) -> list[int]:
    """None, an int, or a sequence of ints -> the list of end-of-sequence ids (ValueError otherwise)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
        return [int(eos_token_id)]
    if np.ndim(eos_token_id) == 1 and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool)
                                          for e in eos_token_id):
        return [int(e) for e in eos_token_id]
    raise ValueError(f"eos_token_id must be None, an int or a sequence of ints, got {eos_token_id!r}")


def _knobs(cfg, B, temperature, top_k, top_p, eos_token_id, key, pad_token_id):
    """Sampling parameters as per-row device arrays (traced, so new values never recompile)."""
    def per_row(name, value, dtype):
        arr = np.broadcast_to(np.asarray(value, dtype), (B,)) if np.ndim(value) == 0 else np.asarray(value, dtype)
        if arr.shape != (B,):
            raise ValueError(f"{name} must be a scalar or have shape [{B}], got shape {arr.shape}")
        return arr

    temp = per_row("temperature", temperature, np.float32)
    if (temp < 0).any() or not np.isfinite(temp).all():
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    k = per_row("top_k", top_k, np.int32)
    if (k < 0).any():
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k!r}")
    p = per_row("top_p", top_p, np.float32)
    if ((p <= 0) | (p > 1)).any():
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    eos = eos_ids(eos_token_id)
    for name, v in [*(("eos_token_id", e) for e in eos), ("pad_token_id", pad_token_id)]:
        if v is not None and not 0 <= int(v) < cfg.vocab_size:
            raise ValueError(f"{name}={v} is outside the vocabulary [0, {cfg.vocab_size})")
    # A fixed width (-1 padded) so that one to EOS_WIDTH ids share one compiled program.
    width = max(EOS_WIDTH, -(-len(eos) // EOS_WIDTH) * EOS_WIDTH)
    return {"temperature": jnp.asarray(temp), "top_k": jnp.asarray(k), "top_p": jnp.asarray(p),
            "eos": jnp.asarray(np.pad(np.asarray(eos, np.int32), (0, width - len(eos)),
                                      constant_values=-1)),
            "pad": jnp.asarray(pad_token_id, jnp.int32),
            "key": key if key is not None else jax.random.key(0)}


def _place_knobs(mesh, knobs):
    if mesh is None:
        return knobs
    per_row = {k: knobs[k] for k in ("temperature", "top_k", "top_p")}
    placed = dict(zip(per_row, _placed(mesh, *(np.asarray(v) for v in per_row.values()))))
    rep = sharding.replicated(mesh)
    for k in ("eos", "pad"):
        placed[k] = sharding.to_global(np.asarray(knobs[k]), rep)
    placed["key"] = knobs["key"]  # a scalar key: jit replicates it (in_shardings says so)
    if "budgets" in knobs:
        placed["budgets"] = knobs["budgets"]          # already global (_global_budgets)
    return placed


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, capped at the buffer width."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


def _generate_nocache(cfg, params, tok, lens, max_new_tokens, knobs) -> GenerateOutput:
    B, S = tok.shape
    width = int(lens.max()) + max_new_tokens
    n = min(S, width)
    buf = jnp.zeros((B, width), jnp.int32).at[:, :n].set(jnp.asarray(tok[:, :n], jnp.int32))
    cur, done = jnp.asarray(lens), jnp.zeros((B,), bool)
    toks, actives = [], []
    longest = int(lens.max())  # known on the host: no device sync inside the loop
    for i in range(max_new_tokens):
        w = _bucket(longest + i, width)
        buf, cur, done, t, a = _nocache_step(cfg, w, params, buf, cur, done, jnp.int32(i), knobs)
        toks.append(t)
        actives.append(a)
    return GenerateOutput(jnp.stack(toks, 1), jnp.stack(actives, 1).sum(1, dtype=jnp.int32), None)
