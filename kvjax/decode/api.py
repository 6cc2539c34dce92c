"""The host API: forward, prefill, decode_step, generate.

Axis letters: B batch, T chunk length, S cache slots, V vocab, N new tokens.

Each entry point reads as three stages: validate on the host (validate.py, press/host.py),
place the inputs (one device, or global arrays split by rows over a mesh), and call one
jitted program from programs.py with the config static and the cache donated. Sampling
parameters are traced arrays (sampling.Knobs): changing them never recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding, validate
from ..cache import KVCache, as_pressed, init_cache, layout_name, mesh_of
from ..config import ModelConfig
from ..press import host
from ..press.decoding import DecodingPress
from ..controls import make_controls
from ..sampling_params import check_controls
from ..sampling import Knobs
from . import kvzip, programs
from .nocache import generate_nocache
from .plans import Plan, Segment, flash_block, live_for, live_plan, prefill_compresses
from .programs import GenerateOutput


def forward(cfg: ModelConfig, params, tokens, lengths=None) -> jax.Array:
    """Full causal pass without a cache: tokens [B, S] (right-padded) -> logits float32 [B, S, V].

    Logits at padding positions (t >= lengths[b]) are computed but meaningless.
    """
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    validate.check_token_ids(cfg, tok, lens)
    validate.check_room(cfg, np.zeros_like(lens), lens, tok.shape[1], "forward")
    return programs.forward_program(cfg, params, jnp.asarray(tok, jnp.int32), jnp.asarray(lens))


# Prompts wider than this are prefilled in chunks of this width (see `prefill`).
PREFILL_CHUNK = 1024


def prefill(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, press=None,
            prefill_chunk: int | None = PREFILL_CHUNK):
    """Append a right-padded chunk at each row's current cache length.

    tokens: int [B, T]; lengths: int [B], real tokens of this chunk per row (>= 1).
    press: a kvjax.press press: the chunk is scored and only what each kv head keeps is
    written (the cache may be smaller than the chunk). The chunk's own logits are those of
    the full chunk (it attends to all of itself, as in kvpress); later tokens see what was
    kept, at the original positions, and continue at the uncompressed length.
    prefill_chunk (default PREFILL_CHUNK = 1024; None or 0: one call): when T is wider, each
    row's tokens [i*C, (i+1)*C) are appended by the i-th call of one compiled program of
    width C, so attention scores take memory linear in the prompt, not quadratic. Results
    equal one call's (logits within float32 rounding: the softmax sums run over other
    widths). Presses (kvpress scores the whole context at once), pressed caches and KIVI
    (one call's queries see the whole prompt unquantised) always take one call.
    Returns (logits of each row's last real token, float32 [B, V]; the new cache).
    The input cache is donated: use the returned one.
    """
    tok = validate.as_tokens(tokens)
    lens = validate.as_lengths(lengths, tok)
    C = _chunk_width(prefill_chunk)
    validate.check_cache(cfg, cache, tok.shape[0])
    validate.check_token_ids(cfg, tok, lens)
    mesh = mesh_of(cache)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh, tok.shape[0])
    if getattr(press, "whole_model", False):   # KVzip: its own reconstruction passes
        return kvzip.prefill(press, cfg, params, tok, lens, cache)
    if _chunks(C, tok.shape[1], cache, press):
        used = sharding.to_host(cache.lengths)
        validate.check_room(cfg, used, lens, cache.max_len, "prefill", cache.bounded)
        return _prefill_chunks(cfg, params, tok, lens, cache, C, used)
    return _prefill_once(cfg, params, tok, lens, cache, press, mesh)


def _prefill_once(cfg, params, tok, lens, cache: KVCache, press, mesh):
    """One prefill program over the whole (checked) chunk."""
    used = sharding.to_host(cache.lengths)
    budgets, live = None, None
    if press is not None or cache.pressed:
        if press is not None:
            host.check_press(press, cfg, cache, mesh, "prefill")
            budgets = host.prefill_budgets(press, cfg, cache, lens, "prefill")
            press = press.static()
        else:
            host.check_room(cache, lens * host.per_token(cfg, cache), "prefill")
        validate.check_room(cfg, used, lens, cache.max_len, "prefill", bounded=False)
    else:
        validate.check_room(cfg, used, lens, cache.max_len, "prefill", cache.bounded)
        live = live_for(cache, int((used + lens).max()))
    fn = programs.prefill_program if mesh is None else _mesh_program(cfg, mesh, cache, press, "prefill")
    return fn(cfg, params, *_placed(mesh, tok.astype(np.int32), lens), cache, live, press,
              _global_budgets(mesh, budgets))


def _chunk_width(prefill_chunk) -> int:
    """prefill_chunk as a width (0: one call); a clear error for anything else."""
    if prefill_chunk is None:
        return 0
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be None, 0 (one call) or a positive int, got {prefill_chunk!r}")
    return int(prefill_chunk)


def _chunks(C: int, width: int, cache: KVCache, press) -> bool:
    """Whether a prompt this wide is prefilled in chunks of width C."""
    return 0 < C < width and press is None and not cache.pressed and cache.kind != "kivi"


def _prefill_chunks(cfg, params, tok, lens, cache: KVCache, C: int, used: np.ndarray):
    """Prefill checked prompts [B, T] in chunks of width C: row b's chunk i is its tokens
    [i*C, (i+1)*C) (zero of them once its prompt has ended: such a row writes nothing and
    keeps its length). Every chunk is padded to width C, so one program serves them all; each
    row's logits are those of the chunk holding its last real token. used: the cache lengths
    before (host), so no chunk waits for the previous one to pick its live prefix. Without a
    mesh, full dense/int8 layers read key blocks up to the rows' ends in a traced loop
    (plans.flash_block) instead of a static live prefix: one compiled program for all chunks."""
    mesh = mesh_of(cache)
    flash = flash_block(cache, mesh)
    extra = () if flash is None else (flash,)
    B, T = tok.shape
    n = -(-T // C)
    padded = np.zeros((B, n * C), np.int32)
    padded[:, :T] = tok
    logits = None
    fn = programs.prefill_program if mesh is None else _mesh_program(cfg, mesh, cache, None, "prefill")
    for i in range(n):
        part = np.clip(lens - i * C, 0, C).astype(np.int32)
        if not part.any():
            break
        live = None if flash else live_for(cache, int((used + part).max()))
        chunk, part_d, has = _placed(mesh, padded[:, i * C:(i + 1) * C], part, part > 0)
        out, cache = fn(cfg, params, chunk, part_d, cache, live, None, None, *extra)
        used = used + part
        logits = out if logits is None else jnp.where(has[:, None], out, logits)
    return logits, cache


def decode_step(cfg: ModelConfig, params, tokens, cache: KVCache, check: bool = True):
    """One new token per row: tokens int [B] -> (logits float32 [B, V], new cache).

    Computes Q/K/V for the new token only and attends over the row's cached prefix.
    `check=False` skips the host checks (token range, free cache slot), which read the
    tokens and cache lengths back from the device and so wait for the previous step.
    """
    live = _check_step(cfg, tokens, cache) if check else None   # None: read every slot
    mesh = mesh_of(cache)
    if mesh is None:
        return programs.decode_program(cfg, params, jnp.asarray(tokens, jnp.int32), cache, live)
    if not isinstance(tokens, jax.Array) or tokens.is_fully_addressable:
        (tokens,) = _placed(mesh, np.asarray(tokens, np.int32))
    return _mesh_program(cfg, mesh, cache, None, "decode")(cfg, params, tokens, cache, live)


def _check_step(cfg: ModelConfig, tokens, cache: KVCache) -> int | None:
    """decode_step's host checks; returns the live prefix the step reads (None: every slot)."""
    tok = np.asarray(tokens)
    if tok.ndim != 1:
        raise ValueError(f"decode_step takes one token per row, shape [B]; got shape {tok.shape}")
    validate.check_cache(cfg, cache, tok.shape[0])
    ones = np.ones_like(tok, dtype=np.int32)
    validate.check_token_ids(cfg, validate.as_tokens(tok[:, None]), ones)
    used = sharding.to_host(cache.lengths)
    if cache.pressed:
        host.check_room(cache, ones * host.per_token(cfg, cache), "decode_step")
        validate.check_room(cfg, used, ones, cache.max_len, "decode_step", bounded=False)
        return None
    validate.check_room(cfg, used, ones, cache.max_len, "decode_step", cache.bounded)
    return live_for(cache, int(used.max()) + 1)


def generate(cfg: ModelConfig, params, prompt_tokens, prompt_lengths=None, max_new_tokens: int = 32,
             temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, key=None, max_len=None,
             cache: KVCache | None = None, use_cache: bool = True, pad_token_id: int = 0,
             mesh=None, cache_kind: str = "dense", num_sinks: int | None = None,
             press=None, prefill_chunk: int | None = PREFILL_CHUNK, speculate=None,
             presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
             min_p=0.0, min_tokens=0, ignore_eos: bool = False, **cache_options) -> GenerateOutput:
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
    "window", "sinks"; see kvjax/cache/). window/sinks caches of `max_len` slots generate past
    max_len by design; dense and int8 raise when prompt + max_new_tokens exceeds it.
    `prefill_chunk`: a prompt wider than this is prefilled in chunks as `prefill` does (all
    but each row's last chunk on the host, then the last chunk and the whole decode loop in
    one program); None or 0: the prompt in one call. Presses, KIVI and pressed caches always
    prefill in one call.
    `speculate`: a `kvjax.PromptLookup` or `kvjax.DraftModel` (every cache kind and press;
    not on a mesh): the same greedy tokens, the same distribution when sampling; returns a
    `SpeculativeOutput` (plus `stats`). Past the proposer's `max_verify_tokens` (B x (k + 1))
    a batch proposes fewer tokens per row, or decodes plainly (no proposals counted).
    Logit controls (penalties, logit_bias, min_p, min_tokens: kvjax/controls.py), per row or
    for all; with `speculate` a batch using them decodes plainly. ignore_eos: no EOS stops.
    """
    tok, lens = _prompts(cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    B, S = tok.shape
    C = _chunk_width(prefill_chunk)
    controls = _controls(cfg, tok, lens, int(max_new_tokens), presence_penalty, frequency_penalty,
                         repetition_penalty, logit_bias, min_p, min_tokens)
    knobs = Knobs.make(cfg.vocab_size, B, temperature, top_k, top_p, None if ignore_eos else eos_token_id, key,
                       pad_token_id, controls)
    if not use_cache:
        return _nocache(cfg, params, tok, lens, int(max_new_tokens), knobs, cache, max_len)
    if speculate is not None:    # (a ring allocated here gets the lookahead's slack slots)
        _check_speculate(cfg, speculate, cache is None and cache_kind != "kivi", cache_options)
    cache = _generate_cache(cfg, B, S, max_new_tokens, max_len, cache, mesh, cache_kind, num_sinks, press,
                            cache_options)
    verify = 0 if speculate is None or controls is not None else _verify_tokens(speculate, B)
    if verify:
        return _speculative(cfg, params, tok, lens, int(max_new_tokens), knobs, cache, speculate, C, press, verify)
    if (mesh := mesh_of(cache)) is not None:
        sharding.check_mesh(cfg, mesh, B)
    if _chunks(C, S, cache, press):
        tok, lens, cache = _prefill_head(cfg, params, tok, lens, cache, C, int(max_new_tokens))
        S = tok.shape[1]
    plan, budgets = _plan(cfg, cache, press, mesh, lens, int(max_new_tokens), S)
    fn = programs.generate_program if mesh is None else _mesh_program(cfg, mesh, cache, press, "generate",
                                                                      controls is not None)
    out = fn(cfg, params, *_placed(mesh, tok.astype(np.int32), lens), cache, plan, _place_knobs(mesh, knobs),
             budgets)
    return out if speculate is None else _plain_speculative(out)


def _prompts(cfg, prompt_tokens, prompt_lengths, max_new_tokens):
    """generate's checked prompts: (tokens [B, S], lengths [B]) on the host."""
    tok = validate.as_tokens(prompt_tokens, "prompt_tokens")
    lens = validate.as_lengths(prompt_lengths, tok, "prompt_lengths")
    validate.check_token_ids(cfg, tok, lens, "prompt_tokens")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    return tok, lens


def _controls(cfg, tok, lens, N: int, presence, frequency, repetition, logit_bias, min_p, min_tokens):
    """generate's logit controls (checked; kvjax/controls.py), or None when all are defaults."""
    settings = dict(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
                    logit_bias=logit_bias, min_p=min_p, min_tokens=min_tokens)
    check_controls(cfg.vocab_size, max_tokens=N, where="generate", **settings)
    if logit_bias is not None and not isinstance(logit_bias, dict) and len(logit_bias) != tok.shape[0]:
        raise ValueError(f"generate: logit_bias must be one dict or one per row ({tok.shape[0]}), "
                         f"got {len(logit_bias)}")
    return make_controls(cfg.vocab_size, tok.shape[0], [row[:n] for row, n in zip(tok, lens)], **settings)


def _plain_speculative(out):
    """A generate(speculate=...) whose batch was past the proposer's verify budget, decoded
    plainly, as a SpeculativeOutput (no proposals)."""
    from .speculative import plain_output
    return plain_output(out)


def _nocache(cfg, params, tok, lens, N: int, knobs, cache, max_len):
    """generate(use_cache=False): every token re-runs the model over its prefix."""
    if cache is not None:
        raise ValueError("use_cache=False cannot continue from a cache; pass cache=None")
    limit = max_len if max_len is not None else tok.shape[1] + N
    validate.check_room(cfg, lens, np.full_like(lens, N), limit, "generate")
    return generate_nocache(cfg, params, tok, lens, N, knobs)


def _verify_tokens(speculate, B: int) -> int:
    """Proposals per row for a batch of B (0: decode plainly; see speculative.tokens_to_verify)."""
    from .speculative import tokens_to_verify
    return tokens_to_verify(speculate, B)


def _check_speculate(cfg, speculate, allocates: bool, cache_options: dict) -> None:
    """Refuse what cannot speculate; a cache generate allocates gets rings with room for the
    lookahead (`ring_slack`)."""
    speculate.check(cfg)
    if allocates:
        cache_options.setdefault("ring_slack", int(speculate.num_tokens))


def _speculative(cfg, params, tok, lens, N: int, knobs, cache: KVCache, speculate, C: int, press, k: int):
    """generate(speculate=...): prefill (chunked as usual; with `press` as plain generate
    presses), then the speculative loop proposing k tokens per row (a DecodingPress compacting
    on plain generate's schedule)."""
    from . import speculative
    speculative.check_cache(cfg, cache, int(speculate.num_tokens))
    if mesh_of(cache) is not None:
        raise ValueError("generate(speculate=...): caches on a mesh are not supported yet; pass mesh=None")
    used = sharding.to_host(cache.lengths)
    if press is not None or cache.pressed:
        _plan(cfg, cache, press, None, lens, N, tok.shape[1])        # plain generate's room checks
    else:
        validate.check_room(cfg, used, lens + N, cache.max_len, f"generate (prompt + max_new_tokens={N})",
                            cache.bounded)
    draft = speculative.draft_cache_for(speculate, tok.shape[0], int(lens.max()) + N,
                                        "int8" if cache.kind == "int8" else "dense")
    if draft is not None:
        if used.any():
            raise ValueError("generate(speculate=DraftModel(...)) continues only from an empty cache: the "
                             "draft model needs the whole history; pass the full prompt with cache=None")
        _, draft = prefill(speculate.cfg, speculate.params, tok, lens, draft, prefill_chunk=C)
    plan = speculate.plan()._replace(num_tokens=k)
    if isinstance(press, DecodingPress):
        compressed = prefill_compresses(press, tok.shape[1])
        logits, cache = prefill(cfg, params, tok, lens, as_pressed(cache), prefill_chunk=C)
        cache = programs.compress_program(cache, press) if compressed else cache
        plan = plan._replace(decoding=press, first_compression=press.compression_interval - (not compressed))
    else:
        logits, cache = prefill(cfg, params, tok, lens, cache, press=press, prefill_chunk=C)
    return speculative.generate_speculative(cfg, params, logits, cache, tok, lens, N, knobs, plan,
                                            speculate, draft)


def _prefill_head(cfg, params, tok, lens, cache: KVCache, C: int, N: int):
    """Prefill every chunk of width C but each row's last (the one holding its last prompt
    token) on the host; returns (that last chunk [B, C], its lengths (>= 1), the cache)."""
    used = sharding.to_host(cache.lengths)
    validate.check_room(cfg, used, lens + N, cache.max_len, f"generate (prompt + max_new_tokens={N})",
                        cache.bounded)
    head = (C * ((lens - 1) // C)).astype(np.int32)       # row b's tokens before its last chunk
    if head.max() > 0:
        _, cache = _prefill_chunks(cfg, params, tok[:, :int(head.max())], head, cache, C, used)
    cols = np.minimum(head[:, None] + np.arange(C)[None, :], tok.shape[1] - 1)
    tail = np.take_along_axis(tok, cols, axis=1)
    return tail, (lens - head).astype(np.int32), cache


def _generate_cache(cfg, B, S, max_new_tokens, max_len, cache, mesh, cache_kind, num_sinks, press,
                    cache_options) -> KVCache:
    """The cache a generate call runs on: the given one (checked), or a new one."""
    if cache is None:
        if mesh is not None:
            sharding.check_mesh(cfg, mesh, B)
        if press is not None:   # as kvpress: every layer pressed (hybrid=True: only the full ones)
            cache_options.setdefault("hybrid", False)
        cache = init_cache(cfg, B, max_len if max_len is not None else S + max_new_tokens, mesh=mesh,
                           kind=cache_kind, num_sinks=num_sinks, **cache_options)
    elif max_len is not None and max_len != cache.max_len:
        raise ValueError(f"max_len={max_len} disagrees with the given cache's max_len={cache.max_len}")
    validate.check_cache(cfg, cache, B)
    return cache


def _plan(cfg, cache, press, mesh, lens, N: int, width: int) -> tuple[Plan, object]:
    """(static plan, placed press budgets or None) for a generate; checks the room first."""
    used = sharding.to_host(cache.lengths)
    what = f"generate (prompt + max_new_tokens={N})"
    if press is None and not cache.pressed:
        validate.check_room(cfg, used, lens + N, cache.max_len, what, cache.bounded)
        return Plan(*live_plan(int((used + lens).max()), N, cache)), None
    plan, budgets = _pressed_plan(cfg, cache, press, mesh, lens, N, width, what)
    validate.check_room(cfg, used, lens + N, cache.max_len, what, bounded=False)
    return plan, budgets


def _pressed_plan(cfg, cache, press, mesh, lens, N: int, width: int, what: str) -> tuple[Plan, object]:
    """The plan of a generate that presses its prompt, runs a DecodingPress, or continues a
    pressed cache; checks the room every layer needs first."""
    if press is not None:
        host.check_press(press, cfg, cache, mesh, "generate")
    if isinstance(press, DecodingPress):
        _, segments = live_plan(0, N, cache, press, width)
        host.check_decoding_room(cache, press, lens, segments, prefill_compresses(press, width), what)
        return Plan(None, segments, None, press), None
    if press is None:
        host.check_room(cache, (lens + N) * host.per_token(cfg, cache), what)
        return Plan(None, (Segment(N),)), None          # a pressed cache reads all its slots
    budgets = _global_budgets(mesh, host.prefill_budgets(press, cfg, cache, lens, what))
    kept = press.kept_bound(lens, cfg)
    host.check_room(cache, np.asarray(kept) + N * host.per_token(cfg, cache), what,
                    scale=cfg.num_kv_heads if getattr(press, "pooled", False) and not cache.pooled else 1)
    return Plan(None, (Segment(N),), press.static()), budgets


# ----------------------------------------------------------------------------- placement

def _mesh_program(cfg, mesh, cache: KVCache, press, name: str, controls: bool = False):
    """The `name` program of `programs.mesh_programs` for this cache's kind and layouts (and
    knobs with logit controls or without)."""
    layout_in = layout_name(cache)
    if cache.pooled or getattr(press, "pooled", False):
        layout_out = "pooled"
    else:
        layout_out = "pressed" if (cache.pressed or press is not None) else "plain"
    return programs.mesh_programs(cfg, mesh, cache.kind, cache.num_sinks, layout_in, layout_out,
                                  cache.rings, controls)[name]


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


def _place_knobs(mesh, knobs: Knobs) -> Knobs:
    """Per-row knobs split by rows over the mesh, the rest replicated (the key: jit replicates it)."""
    if mesh is None:
        return knobs
    temperature, top_k, top_p = _placed(mesh, knobs.temperature, knobs.top_k, knobs.top_p)
    rep = sharding.replicated(mesh)
    controls = knobs.controls
    if controls is not None:
        controls = jax.tree.map(lambda a: _placed(mesh, np.asarray(a))[0], controls)
    return knobs.replace(temperature=temperature, top_k=top_k, top_p=top_p,
                         eos=sharding.to_global(np.asarray(knobs.eos), rep),
                         pad=sharding.to_global(np.asarray(knobs.pad), rep), controls=controls)
