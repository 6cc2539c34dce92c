"""Token sampling as pure functions of (logits, key, traced parameters).

Axis letters: B batch, V vocab. Every parameter is an array (per row, shape [B]), so
changing a temperature or top-p inside a jitted loop never recompiles.

Order follows Hugging Face's warpers: temperature, then top-k, then top-p, then a
categorical draw. Temperature 0 means greedy for that row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .controls import apply_controls, count_tokens
from .sampling_params import INT32_MAX, SamplingError

_NEG_INF = -jnp.inf


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> int32 [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array | None = None
                  ) -> jax.Array:
    """Set to -inf every logit outside the top-k, outside the top-p nucleus and (min_p) below
    min_p times the most likely token's probability.

    logits: float [B, V]; top_k: int [B] (<= 0 disables); top_p: float [B] (>= 1 disables);
    min_p: float [B] (0 disables) or None. top-p keeps the smallest set of most likely tokens
    whose probability mass (after top-k) is >= p. Ties at the threshold logit are kept
    together. min_p keeps logit >= max logit + log(min_p) (Hugging Face's MinPLogitsWarper:
    the most likely token always stays).
    """
    V = logits.shape[-1]
    order = jnp.sort(logits, axis=-1)[:, ::-1]                           # [B, V] descending
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]                       # [1, V]
    in_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])               # [B, V]
    kept = jnp.where(in_k, order, _NEG_INF)
    probs = jax.nn.softmax(kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(keep.sum(-1), 1)                                # the top token always stays
    threshold = jnp.take_along_axis(order, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    if min_p is not None:
        floor = order[:, :1] + jnp.log(min_p)[:, None]                        # log(0) = -inf: keeps all
        threshold = jnp.maximum(threshold, jnp.minimum(floor, order[:, :1]))
    return jnp.where(logits >= threshold, logits, _NEG_INF)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, min_p: jax.Array | None = None) -> jax.Array:
    """Draw one token per row. logits [B, V]; parameters [B] (min_p [B] or None) -> int32 [B].

    Rows with temperature 0 take the argmax. When every row is greedy the sort and the
    draw are skipped at run time (`lax.cond`), so greedy decoding pays nothing for them.
    """
    logits = logits.astype(jnp.float32)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = filter_logits(logits / t, top_k, top_p, min_p)
        drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy(logits))

    return jax.lax.cond(jnp.all(temperature <= 0), greedy, draw, logits)


# ----------------------------------------------------------------------------- validation and knobs

# Temperatures a float32 sampler divides by without overflow: 0 (greedy) or within these.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 1e5


def check_sampling(temperature, top_k, top_p, where: str = "") -> None:
    """The one range check of sampling parameters (scalars or per-row arrays), used by
    `generate`, `Engine` and `kvjax serve`: temperature 0 (greedy) or in [MIN_TEMPERATURE,
    MAX_TEMPERATURE] (logits / temperature stays finite in float32), top_k an int in
    [0, 2**31 - 1] (0 disables it; anything >= the vocabulary keeps every token), top_p in
    (0, 1] (1 disables it). Raises SamplingError naming the parameter, its value and the limit."""
    pre = f"{where}: " if where else ""
    try:
        temp = np.asarray(temperature, np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SamplingError("temperature", f"{pre}temperature must be a number, got {temperature!r}") from None
    out = (temp != 0) & ((temp < MIN_TEMPERATURE) | (temp > MAX_TEMPERATURE))
    if not np.isfinite(temp).all() or out.any():
        raise SamplingError("temperature", f"{pre}temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                           f"{MAX_TEMPERATURE:g}], got {temperature!r}")
    k = np.asarray(top_k, dtype=object if isinstance(top_k, int) else None)
    ints = isinstance(top_k, (int, np.integer)) or np.issubdtype(k.dtype, np.integer) or k.size == 0 or \
        (k.dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in k.flat))
    if isinstance(top_k, bool) or not ints or (k < 0).any() or (k > INT32_MAX).any():
        raise SamplingError("top_k", f"{pre}top_k must be an int in [0, {INT32_MAX}] (0 disables it), "
                                     f"got {top_k!r}")
    p = np.asarray(top_p, np.float64)
    if not np.isfinite(p).all() or ((p <= 0) | (p > 1)).any():
        raise SamplingError("top_p", f"{pre}top_p must be in (0, 1], got {top_p!r}")


EOS_WIDTH = 8   # Knobs.eos holds up to this many end-of-sequence ids without a new program


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


@dataclass(frozen=True)
class Knobs:
    """Sampling state of a decode loop, all traced (new values never recompile).

    temperature float32 [B], top_k int32 [B], top_p float32 [B]: per row; eos int32 [E]
    (-1 padded to a multiple of EOS_WIDTH); pad int32 []: the token a finished row emits;
    key: the PRNG key (step i draws with fold_in(key, i)); controls: the rows' logit
    controls (kvjax/controls.py: penalties, logit bias, min_p, min_tokens), or None when
    every row keeps the defaults (the loop then carries no token counts)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    eos: jax.Array
    pad: jax.Array
    key: jax.Array
    controls: object = None

    @classmethod
    def make(cls, vocab_size: int, batch_size: int, temperature=0.0, top_k=0, top_p=1.0,
             eos_token_id=None, key=None, pad_token_id: int = 0, controls=None) -> "Knobs":
        """Validated knobs for B rows from scalars or per-row [B] values, as device arrays."""
        rows = {name: _per_row(name, v, batch_size, dt) for name, v, dt in
                (("temperature", temperature, np.float32), ("top_k", top_k, np.int32),
                 ("top_p", top_p, np.float32))}
        check_sampling(temperature, top_k, top_p)
        eos = eos_ids(eos_token_id)
        for name, v in [*(("eos_token_id", e) for e in eos), ("pad_token_id", pad_token_id)]:
            if v is not None and not 0 <= int(v) < vocab_size:
                raise ValueError(f"{name}={v} is outside the vocabulary [0, {vocab_size})")
        # A fixed width (-1 padded) so that one to EOS_WIDTH ids share one compiled program.
        width = max(EOS_WIDTH, -(-len(eos) // EOS_WIDTH) * EOS_WIDTH)
        eos = np.pad(np.asarray(eos, np.int32), (0, width - len(eos)), constant_values=-1)
        return cls(**{k: jnp.asarray(v) for k, v in rows.items()}, eos=jnp.asarray(eos),
                   pad=jnp.asarray(pad_token_id, jnp.int32), key=key if key is not None else jax.random.key(0),
                   controls=controls)

    def replace(self, **changes) -> "Knobs":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(Knobs, data_fields=["temperature", "top_k", "top_p", "eos", "pad", "key",
                                                    "controls"], meta_fields=[])


def _per_row(name: str, value, batch_size: int, dtype) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.broadcast_to(arr, (batch_size,))
    if arr.shape != (batch_size,):
        raise ValueError(f"{name} must be a scalar or have shape [{batch_size}], got shape {arr.shape}")
    return arr.astype(dtype)


def start_counts(knobs: Knobs, batch_size: int, vocab_size: int):
    """The token counts a decode loop carries for knobs.controls: zeros int32 [B, V], or None
    when the knobs have no controls."""
    return None if knobs.controls is None else jnp.zeros((batch_size, vocab_size), jnp.int32)


def pick(logits: jax.Array, i, done: jax.Array, knobs: Knobs, counts=None):
    """Sample token i for rows not yet done: (tokens int32 [B], active [B], new done [B], new
    counts). counts: int32 [B, V] tokens generated so far (`start_counts`), None without
    controls; the drawn tokens are counted for active rows."""
    min_p = None
    if knobs.controls is not None:
        logits = apply_controls(logits, knobs.controls, counts, i, knobs.eos)
        min_p = knobs.controls.min_p
    tok = sample(logits, jax.random.fold_in(knobs.key, i), knobs.temperature, knobs.top_k, knobs.top_p, min_p)
    active = ~done
    tok = jnp.where(active, tok, knobs.pad)
    is_eos = (tok[:, None] == knobs.eos[None, :]).any(axis=-1)   # eos: int32 [E], -1 padded
    if counts is not None:
        counts = count_tokens(counts, tok, active)
    return tok, active, done | (active & is_eos), counts
