"""The jitted programs every entry point runs: forward, prefill chunk, decode step, decode loop,
generate, and the no-cache step; plus the same programs with mesh shardings (pjit).

Axis letters: B batch, T chunk length, S cache slots, V vocab, N new tokens.

Traced cores (plain functions, usable inside other jitted code): `append_chunk`,
`decode_tokens`, `forward_logits`, `decode_loop` (`decode_loop_counted`: the same, plus
the steps it ran), `generate_core`. Jitted programs (config
and plans static, the cache donated so XLA writes new K/V into its own memory):
`forward_program`, `prefill_program`, `decode_program`, `decode_loop_program`,
`generate_program`, `nocache_step_program`, `compress_program`, and `mesh_programs(...)`
for caches on a mesh.
Host checks live in api.py; these programs trust their inputs.

The decode loop stops early: its steps run in `lax.while_loop`s that end once every row has
emitted EOS, with the same tokens, lengths and cache as running every planned step.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import sharding
from ..cache import KVCache, as_pooled, as_pressed, assemble, cache_shardings, chunk_slots
from ..cache.pressed import assemble_chunk
from ..cache.attend import CacheWrite
from ..config import ModelConfig
from ..model import Transformer, init_params
from ..press.decoding import compress_cache
from ..controls import Controls
from ..sampling import Knobs, pick, start_counts
from .plans import Plan, prefill_compresses


class GenerateOutput(NamedTuple):
    tokens: jax.Array   # int32 [B, N]: new tokens; after a row's EOS, pad_token_id
    lengths: jax.Array  # int32 [B]: tokens generated per row, EOS included
    cache: KVCache | None  # prompt + every generated token (None for use_cache=False)


# ----------------------------------------------------------------------------- traced cores

def append_chunk(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, live: int | None = None,
                 press=None, budgets=None, flash: int | None = None, every_logit: bool = False):
    """Append a right-padded chunk [B, T] at each row's cache length; logits of its last real
    token [B, V] and the new cache.

    live (static): attention reads only slots [0, live); every row's tokens must end there.
    press (static) / budgets (int32 [L, B, ...]): compact the chunk as it enters (kvjax/press/);
    a pressed cache keeps per-head slot positions from then on.
    flash (static key block width; not in `mesh_programs`): a multi-token chunk
    on full dense/int8 layers reads the cache in blocks up to its rows' ends, with an online
    softmax (cache/dense.attend_flash), so `live` is not needed and one program serves every
    chunk of a width.
    every_logit (static): logits [B, T, V] of every token of the chunk instead of [B, V] of
    each row's last real token (teacher-forced scoring).
    """
    T = tokens.shape[1]
    if press is not None:
        cache = as_pooled(cache) if getattr(press, "pooled", False) else as_pressed(cache)
    starts = cache.lengths
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]   # [B, T]
    # pressed layers place their tokens themselves; a pressed hybrid cache's rings still need slots
    slots = chunk_slots(cache, starts, lengths, T) if cache.hybrid or not cache.pressed else None
    write = CacheWrite(starts, slots, live, press, budgets, flash)
    logits, layers = Transformer(cfg).apply({"params": params}, tokens, positions, lengths, cache, write,
                                            logits_at=None if every_logit else jnp.maximum(lengths - 1, 0))
    logits = logits if every_logit else logits[:, 0]          # [B, T, V] (every_logit) or [B, V]
    if cache.pressed:
        return logits, assemble_chunk(cache, layers, starts, lengths, slots)
    return logits, assemble(cache, layers, starts, lengths, slots)


def decode_tokens(cfg: ModelConfig, params, tokens, cache: KVCache, active, live=None):
    """One token per row [B]; rows with active=False write nothing and keep their length."""
    return append_chunk(cfg, params, tokens[:, None], active.astype(jnp.int32), cache, live)


def forward_logits(cfg: ModelConfig, params, tokens, lengths, logits_at=None):
    """The no-cache pass: tokens [B, T] -> float32 logits [B, T, V] (or [B, 1, V] at logits_at)."""
    T = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, lengths, logits_at=logits_at)
    return logits


def decode_all(cfg: ModelConfig, params, tokens, cache: KVCache, live=None):
    """`decode_step`'s program: one token for every row."""
    return decode_tokens(cfg, params, tokens, cache, jnp.ones(tokens.shape, bool), live)


def decode_loop(cfg, params, logits, cache, segments, knobs: Knobs, decoding=None, stop_early: bool = True):
    """Steps of (sample, decode) in `lax.while_loop`s: the decode program of `generate`.

    segments (static, plans.Segment): one loop per segment, each reading only the cache
    prefix its tokens can reach (live; None reads every slot); a segment with repeat r > 1
    is an outer scan of r periods, each up to `steps` steps followed by a DecodingPress
    compaction when `compress` (compactions keep their schedule). Step i samples token i from
    the current logits, then decodes it, so the returned cache holds every generated token
    (ready for the next prefill of a conversation).

    stop_early (static): once every row has emitted EOS, the loops stop running steps; the
    skipped steps' tokens are pad and inactive, exactly what running them gives, and the cache
    is the same (inactive rows write nothing). The logits returned are then those of the last
    step run. Returns (GenerateOutput, logits after the last step run).
    """
    out, logits, _ = decode_loop_counted(cfg, params, logits, cache, segments, knobs, decoding, stop_early)
    return out, logits


def decode_loop_counted(cfg, params, logits, cache, segments, knobs: Knobs, decoding=None,
                        stop_early: bool = True):
    """`decode_loop` plus the number of decode steps it ran (int32 []; with stop_early, fewer
    than the planned steps when every row finishes early)."""
    done = jnp.zeros(logits.shape[:1], bool)
    counts = start_counts(knobs, *logits.shape)      # generated-token counts (logit controls only)
    toks, actives, first, ran = [], [], 0, jnp.int32(0)
    for seg in segments:
        carry, (tok, active), n = _segment(cfg, params, (logits, cache, done, counts), seg, first, knobs,
                                           decoding, stop_early)
        logits, cache, done, counts = carry
        toks.append(tok)
        actives.append(active)
        first += seg.steps * seg.repeat
        ran = ran + n
    if not toks:
        B = logits.shape[0]
        toks, actives = [jnp.zeros((0, B), jnp.int32)], [jnp.zeros((0, B), bool)]
    toks, active = jnp.concatenate(toks, 0), jnp.concatenate(actives, 0)
    return GenerateOutput(toks.T, active.sum(0, dtype=jnp.int32), cache), logits, ran


def _steps(cfg, params, carry, n: int, i0, live, knobs: Knobs, stop_early: bool):
    """Up to n decode steps i0, i0 + 1, ... in a `lax.while_loop` that ends early once every
    row is done: (carry, (tokens [n, B] (pad where not run), active [n, B]), steps run)."""
    B = carry[2].shape[0]
    bufs = (jnp.broadcast_to(knobs.pad, (n, B)).astype(jnp.int32), jnp.zeros((n, B), bool))

    def more(state):
        j, (_, _, done, _), _ = state
        return (j < n) & ~jnp.all(done) if stop_early else j < n

    def step(state):
        j, (logits, cache, done, counts), (toks, acts) = state
        tok, active, done, counts = pick(logits, i0 + j, done, knobs, counts)
        logits, cache = decode_tokens(cfg, params, tok, cache, active, live)
        bufs = (toks.at[j].set(tok), acts.at[j].set(active))
        return j + 1, (logits, cache, done, counts), bufs

    j, carry, bufs = jax.lax.while_loop(more, step, (jnp.int32(0), carry, bufs))
    return carry, bufs, j


def _segment(cfg, params, carry, seg, first: int, knobs: Knobs, decoding, stop_early: bool):
    """One segment's loops: ((logits, cache, done, counts), (tokens [n, B], active [n, B]), steps run)."""
    def period(carry, i0):
        carry, out, ran = _steps(cfg, params, carry, seg.steps, i0, seg.live, knobs, stop_early)
        if seg.compress:
            logits, cache, done, counts = carry
            carry = (logits, compress_cache(cache, decoding), done, counts)
        return carry, (out, ran)

    if seg.repeat == 1:
        carry, (out, ran) = period(carry, jnp.int32(first))
        return carry, out, ran
    carry, ((tok, active), ran) = jax.lax.scan(period, carry,
                                               first + seg.steps * jnp.arange(seg.repeat, dtype=jnp.int32))
    return carry, (tok.reshape(-1, tok.shape[-1]), active.reshape(-1, active.shape[-1])), ran.sum()


def generate_core(cfg, params, prompts, prompt_lengths, cache, plan: Plan, knobs: Knobs, budgets=None):
    """Prefill, then the decode loop (`decode_loop`), all in one jit.

    plan (static): see plans.Plan; budgets: the prompt press's host-computed budgets (traced).
    The decode loop stops running steps once every row has emitted EOS (outputs unchanged).
    """
    return generate_counted(cfg, params, prompts, prompt_lengths, cache, plan, knobs, budgets)[0]


def generate_counted(cfg, params, prompts, prompt_lengths, cache, plan: Plan, knobs: Knobs, budgets=None,
                     stop_early: bool = True):
    """`generate_core` plus the decode steps run (see `decode_loop_counted`)."""
    if plan.decoding is not None:
        cache = as_pressed(cache)
    logits, cache = append_chunk(cfg, params, prompts, prompt_lengths, cache, plan.prefill_live, plan.press,
                                 budgets)
    if plan.decoding is not None and prefill_compresses(plan.decoding, prompts.shape[1]):
        cache = compress_cache(cache, plan.decoding)
    out, _, ran = decode_loop_counted(cfg, params, logits, cache, plan.segments, knobs, plan.decoding, stop_early)
    return out, ran


def nocache_step(cfg, width, params, buf, cur, done, i, knobs: Knobs, counts=None):
    """Re-run the model over each row's whole prefix buf[:, :cur] and append one token.

    `width` (static) is the bucketed prefix length: the cost follows the prefix, not the
    final buffer size, and only one program is compiled per power of two.
    """
    logits = forward_logits(cfg, params, buf[:, :width], cur, logits_at=cur - 1)[:, 0]
    tok, active, done, counts = pick(logits, i, done, knobs, counts)
    rows = jnp.arange(buf.shape[0])
    buf = buf.at[rows, cur].set(jnp.where(active, tok, buf[rows, cur]), mode="drop")
    return buf, cur + active.astype(jnp.int32), done, tok, active, counts


# ----------------------------------------------------------------------------- jitted programs

forward_program = jax.jit(forward_logits, static_argnums=0)
prefill_program = jax.jit(append_chunk, static_argnums=(0, 5, 6, 8), donate_argnums=4)
decode_program = jax.jit(decode_all, static_argnums=(0, 4), donate_argnums=3)
generate_program = jax.jit(generate_core, static_argnums=(0, 5), donate_argnums=4)
# generate's decode loop on its own (benchmarks time it on a cache prefilled outside the timed region)
decode_loop_program = jax.jit(decode_loop, static_argnums=(0, 4, 6, 7), donate_argnums=3)
nocache_step_program = jax.jit(nocache_step, static_argnums=(0, 1), donate_argnums=3)
# a DecodingPress compaction on its own (a speculative generate's prefill that compresses)
compress_program = jax.jit(compress_cache, static_argnums=1, donate_argnums=0)


@lru_cache(maxsize=None)
def mesh_programs(cfg: ModelConfig, mesh, kind: str = "dense", num_sinks: int = 0, layout_in: str = "plain",
                  layout_out: str | None = None, rings: tuple = (), controls: bool = False) -> dict:
    """The prefill, decode and generate programs with explicit in/out shardings (pjit) for
    caches on `mesh`.

    Pinning the output cache to the input cache's sharding keeps it laid out the same way
    across steps: batch over data, kv heads over model (kvjax/cache/sharded.py). A press
    changes the layout (plain -> pressed or pooled): layout_in / layout_out say which; press
    budgets are replicated. controls: the knobs carry logit controls (kvjax/controls.py),
    split by rows like the other per-row knobs.
    """
    params_shape = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ps = sharding.param_shardings(cfg, params_shape, mesh)
    cs = cache_shardings(cfg, mesh, kind, num_sinks, layout_in, rings)
    out = cache_shardings(cfg, mesh, kind, num_sinks, layout_out or layout_in, rings)
    b1, b2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
    rep = sharding.replicated(mesh)
    ctl = Controls(presence=b1, frequency=b1, repetition=b1, min_p=b1, min_tokens=b1, bias=b2, prompt=b2)
    knobs = Knobs(temperature=b1, top_k=b1, top_p=b1, eos=rep, pad=rep, key=rep,
                  controls=ctl if controls else None)
    return {
        "prefill": jax.jit(append_chunk, static_argnums=(0, 5, 6), donate_argnums=4,
                           in_shardings=(ps, b2, b1, cs, rep), out_shardings=(b2, out)),
        "decode": jax.jit(decode_all, static_argnums=(0, 4), donate_argnums=3,
                          in_shardings=(ps, b1, cs), out_shardings=(b2, cs)),
        "generate": jax.jit(generate_core, static_argnums=(0, 5), donate_argnums=4,
                            in_shardings=(ps, b2, b1, cs, knobs, rep),
                            out_shardings=GenerateOutput(b2, b1, out)),
    }
