"""Scoring one method's cache on a batch of samples: the answer it generates (exact match) and
the log-likelihood of the true answer given the cache (teacher-forced).

Axis letters: B samples, Q question tokens, A answer tokens, V vocabulary.

Both read the same cache after the context: the teacher-forced pass appends question +
answer as one chunk without donating the cache (its logits at the question's last token and
at each answer token but the last score the answer), then `generate` continues greedily from
the question on the (donated) cache. A 135M model rarely answers a long-context question
exactly; the log-likelihood still separates the methods.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.decode import append_chunk
from kvjax.tokenizer import model_eos_ids

from .methods import as_tokens, bucket


@partial(jax.jit, static_argnums=(0,))
def _answer_logprobs(cfg, params, seq, lens, cache, targets, at):
    """log p(targets[b, i]) under the logits at chunk index at[b, i] of seq appended to cache."""
    logits, _ = append_chunk(cfg, params, seq, lens, cache, every_logit=True)      # [B, Q + A, V]
    picked = jnp.take_along_axis(logits, at[:, :, None], axis=1)                   # [B, A, V]
    logp = jax.nn.log_softmax(picked.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]        # [B, A]


BUCKET = 32   # chunk widths are rounded up to a multiple of this: batches share programs


def answer_loglik(cfg, params, cache, questions: list, answers: list, width: int | None = None,
                  answer_width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p over each answer's tokens [B], answer token counts [B]) after each row's
    question, teacher-forced, on `cache` (not donated); the chunk is `width` wide (default: the
    longest question + answer rounded up to BUCKET), the answers `answer_width` (default: the
    longest rounded up to 8)."""
    seq, lens = as_tokens([list(q) + list(a) for q, a in zip(questions, answers)], BUCKET, width)
    A = answer_width or bucket(max(len(a) for a in answers), 8)
    targets, alens = as_tokens([list(a) for a in answers], width=A)
    q = np.array([len(x) for x in questions], np.int32)
    at = np.minimum(q[:, None] - 1 + np.arange(A)[None, :], seq.shape[1] - 1).astype(np.int32)
    lp = np.asarray(_answer_logprobs(cfg, params, jnp.asarray(seq), jnp.asarray(lens), cache,
                                     jnp.asarray(targets), jnp.asarray(at)))
    mask = np.arange(A)[None, :] < alens[:, None]
    return np.where(mask, lp, 0.0).sum(1), alens


def greedy_answers(cfg, params, tok, cache, questions: list, max_new_tokens: int,
                   width: int | None = None) -> list[str]:
    """The text each row generates greedily after its question (cache donated), cut at EOS; the
    questions padded to `width` (default: the longest rounded up to BUCKET)."""
    return [tok.decode(ids) for ids in greedy_tokens(cfg, params, tok, cache, questions, max_new_tokens, width)]


def greedy_tokens(cfg, params, tok, cache, questions: list, max_new_tokens: int, width: int | None = None,
                  press=None) -> list[list[int]]:
    """The ids each row generates greedily after its question (cache donated), EOS left out;
    `press`: a DecodingPress compacting as it generates."""
    prompt, lens = as_tokens([list(q) for q in questions], BUCKET, width)
    eos = model_eos_ids(tok, cfg.vocab_size)
    out = kvjax.generate(cfg, params, prompt, lens, max_new_tokens=max_new_tokens, cache=cache,
                         eos_token_id=eos or None, prefill_chunk=None, press=press)
    toks, n = np.asarray(out.tokens), np.asarray(out.lengths)
    stop = set(eos)
    return [[int(t) for t in row[:k] if int(t) not in stop] for row, k in zip(toks, n)]


def room(questions: list, answers: list, max_new_tokens: int) -> int:
    """Slots a method's cache needs after the context: the longer of the teacher-forced chunk
    and the question plus the generated answer."""
    return bucket(max(max(len(q) + bucket(len(a), 8) for q, a in zip(questions, answers)),
                      max(len(q) for q in questions) + max_new_tokens), BUCKET)
