"""Logit controls beyond temperature / top-k / top-p: the per-request knobs of OpenAI's API and
vLLM's, as traced per-row arrays (new values never recompile).

Axis letters: B rows, V vocabulary, E stop ids per row.

What each does to a row's logits before the draw, in this order (vLLM's; the NumPy
reference in tests/test_controls.py follows it rule by rule):

1. logit_bias: bias[b, v] is added (OpenAI: values in [-100, 100]).
2. min_tokens: while fewer than min_tokens tokens are generated, every stop id gets -inf.
3. repetition_penalty r (CTRL, Hugging Face, vLLM): a token seen in the prompt or among
   the generated tokens has its logit divided by r when positive, multiplied by r otherwise.
4. frequency / presence penalties (OpenAI): logit - frequency * count - presence * (count > 0),
   count = how often the token was generated so far (the prompt does not count).

Then `sampling.sample` applies temperature, top-k, top-p and min_p (a token survives only if
its probability is at least min_p times the most likely token's; applied with the others as
Hugging Face's warpers do). Greedy rows take the argmax of the controlled logits.

State: `Controls` (per-row settings, the dense bias [B, V] and the prompt's token set [B, V])
rides in the sampler's knobs; the generated-token counts [B, V] are carried by the decode
loop and updated with each sampled token (`count_tokens`). A batch whose rows all keep the
defaults carries no Controls at all (None): its programs are the plain ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .sampling_params import host_controls, is_default


@dataclass(frozen=True)
class Controls:
    """Per-row logit controls, traced: presence, frequency, repetition, min_p float32 [B],
    min_tokens int32 [B], bias float32 [B, V], prompt bool [B, V] (the prompt's tokens, for
    the repetition penalty)."""

    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    min_p: jax.Array
    min_tokens: jax.Array
    bias: jax.Array
    prompt: jax.Array

    def replace(self, **changes) -> "Controls":
        return dataclasses.replace(self, **changes)


CONTROL_FIELDS = tuple(f.name for f in dataclasses.fields(Controls))

jax.tree_util.register_dataclass(Controls, data_fields=[f.name for f in dataclasses.fields(Controls)],
                                 meta_fields=[])


def make_controls(vocab_size: int, batch_size: int, prompts=None, **settings) -> Controls | None:
    """Device Controls for B rows, or None when every setting is the default."""
    if is_default(**settings):
        return None
    return Controls(**{k: jnp.asarray(v) for k, v in host_controls(vocab_size, batch_size, prompts,
                                                                     **settings).items()})


def apply_controls(logits: jax.Array, ctl: Controls, counts: jax.Array, index: jax.Array,
                   stops: jax.Array) -> jax.Array:
    """Rules 1-4 of the module docstring. logits [B, V]; counts int32 [B, V]; index int32 [B]
    (or []): the index of the token being sampled (= tokens generated so far); stops int32
    [B, E] or [E] (-1 padded): the ids min_tokens holds back. -> float32 [B, V]."""
    logits = logits.astype(jnp.float32) + ctl.bias
    B, V = logits.shape
    stops = jnp.broadcast_to(stops, (B, stops.shape[-1]))
    held = (jnp.broadcast_to(index, (B,)) < ctl.min_tokens)[:, None] & (stops >= 0)       # [B, E]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], stops.shape)
    logits = logits.at[rows, jnp.where(held, stops, V)].set(-jnp.inf, mode="drop")
    seen = ctl.prompt | (counts > 0)
    r = ctl.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    return logits - ctl.frequency[:, None] * counts - ctl.presence[:, None] * (counts > 0)


def count_tokens(counts: jax.Array, tok: jax.Array, emitted: jax.Array) -> jax.Array:
    """counts [B, V] after row b emitted tok[b] (where emitted[b])."""
    return counts.at[jnp.arange(tok.shape[0]), tok].add(emitted.astype(counts.dtype))
