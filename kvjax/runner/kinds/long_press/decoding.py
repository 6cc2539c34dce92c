"""DecodingPress on a long generation: a press that compacts the cache while the model writes,
not the context before it (issue 21, part 3).

Axis letters: B samples, A answer tokens, V vocabulary.

Protocol (kvpress 0.5.5's DecodingPress, as `kvjax.generate(..., press=DecodingPress(...))`
runs it): the context is prefilled uncompressed into a full cache; the question is the first
forward after it (step 1); each time `interval` forwards have run, every layer's cache is cut
to `target_size` entries per kv head by the base press's scores of the cached keys (Knorm,
KeyDiff, StreamingLLM, Random: presses that need no queries). `target_size` is (1 - ratio) of
the context, so a ratio means what it means for the other presses (the share of the context
dropped), while the generation grows the cache again by up to `interval` tokens between
compactions.

Scores, on a task with a long answer (`passage_copy`: a whole passage written out):
  answer log-likelihood  teacher-forced through the same schedule: the question and the
                         answer's tokens are appended in chunks that end exactly where a greedy
                         generation compacts (`plans.decoding_segments`), each followed by that
                         compaction, so every answer token is scored by the cache a generation
                         writing that answer would hold
  token accuracy         the share of the answer's tokens that are the teacher-forced argmax
  exact match            of the greedy generation (`kvjax.generate` with the press)
  agreement              the share of dense's greedy tokens a method's greedy generation
                         reproduces before it first differs
  copied                 the share of the answer's tokens the greedy generation reproduces
                         before it first differs (exact match's graded form)
Bytes: the most a compacting cache holds (target_size + interval slots per head, in the pressed
layout), against dense's cache at the end of the answer (context + question + answer).
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import press as P
from kvjax.cache import as_pressed
from kvjax.decode import append_chunk, decoding_segments
from kvjax.decode.plans import prefill_compresses
from kvjax.press.decoding import compress_cache
from kvjax.timing import compile_watch
from kvjax.tokenizer import model_eos_ids

from ..press_benchmark import make_press
from . import scoring
from .methods import as_tokens, bucket

BASES = ("Knorm", "KeyDiff", "StreamingLLM", "Random")


def make_decoding_press(base: str, ratio: float, interval: int, context_tokens: int, c):
    """DecodingPress(base) keeping (1 - ratio) of a context of `context_tokens` tokens; the base
    press built as the benchmark's other presses are (its own ratio unused: it only scores)."""
    scorer = make_press(base, 0.0, c)
    target = max(1, int(round((1.0 - ratio) * context_tokens)))
    return P.DecodingPress(scorer, compression_interval=interval, target_size=target)


def schedule(press, steps: int, prompt_width: int) -> list[tuple[int, int, bool]]:
    """[(first decode step, end step, compact after)] of a generation of `steps` decode steps
    after a prompt `prompt_width` wide: chunk 0 also holds the prompt (the question); with no
    press, one chunk. Decode step i feeds the i-th generated (here: answer) token."""
    if press is None:
        return [(0, steps, False)]
    out = [(0, 0, True)] if prefill_compresses(press, prompt_width) else []
    at = 0
    for seg in decoding_segments(steps, press, prompt_width):
        for _ in range(seg.repeat):
            if not out or out[-1][2]:
                out.append((at, at + seg.steps, seg.compress))
            else:                               # the question's chunk takes the first segment
                out[-1] = (out[-1][0], at + seg.steps, seg.compress)
            at += seg.steps
    return out or [(0, 0, False)]


@partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _feed(cfg, params, seq, lens, cache, targets, at):
    """Append seq to cache; (log p(targets[b, i]), whether it is the argmax) under the logits at
    chunk index at[b, i], and the cache."""
    logits, cache = append_chunk(cfg, params, seq, lens, cache, every_logit=True)       # [B, T, V]
    picked = jnp.take_along_axis(logits, at[:, :, None], axis=1).astype(jnp.float32)   # [B, A', V]
    logp = jax.nn.log_softmax(picked, axis=-1)
    lp = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
    return lp, jnp.argmax(picked, axis=-1) == targets, cache


@partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _next(cfg, params, seq, lens, cache):
    """Append seq to cache; the argmax after each row's last token [B], and the cache."""
    logits, cache = append_chunk(cfg, params, seq, lens, cache)
    return jnp.argmax(logits, axis=-1), cache


@partial(jax.jit, static_argnums=(1,), donate_argnums=(0,))
def _compact_program(cache, press, target):
    return compress_cache(cache, press, target_size=target)


def compact(cache, press):
    """`press`'s compaction of cache (donated), its target size traced: one program per base
    press for every ratio."""
    canonical = dataclasses.replace(press, compression_interval=1, target_size=1)
    return _compact_program(cache, canonical, jnp.int32(press.target_size))


def _chunk(questions: list, answers: list, a: int, b: int, first: bool):
    """Rows fed by decode steps [a, b) (chunk 0 also the question) and, per row, the answer
    indices they predict with the chunk index of each prediction's logits."""
    rows, preds = [], []
    for q, ans in zip(questions, answers):
        head = list(q) if first else []
        fed = list(ans[a:min(b, len(ans) - 1)])
        rows.append(head + fed)
        # answer token j >= 1 is predicted where token j - 1 was fed; token 0 by the question
        pred = [(j, len(head) + j - 1 - a) for j in range(a + 1, a + len(fed) + 1)]
        preds.append(([(0, len(head) - 1)] if first else []) + pred)
    return rows, preds


def teacher_forced(cfg, params, cache, press, questions: list, answers: list, prompt_width: int):
    """(log p [B, A], argmax hit [B, A], answer lengths [B]) of each row's answer after its
    question on `cache` (donated), compacted by `press` where a greedy generation with a prompt
    `prompt_width` wide would compact (module docstring); entries past an answer's end are 0."""
    B, A = len(answers), max(len(a) for a in answers)
    lp, hit = np.zeros((B, A)), np.zeros((B, A), bool)
    if press is not None:
        cache = as_pressed(cache)
    for k, (a, b, compacts) in enumerate(schedule(press, A - 1, prompt_width)):
        rows, preds = _chunk(questions, answers, a, b, k == 0)
        seq, lens = as_tokens(rows, scoring.BUCKET)
        W = bucket(max(1, max(len(p) for p in preds)), 8)
        targets, at = np.zeros((B, W), np.int32), np.zeros((B, W), np.int32)
        for r, p in enumerate(preds):
            for i, (j, t) in enumerate(p):
                targets[r, i], at[r, i] = answers[r][j], t
        out_lp, out_hit, cache = _feed(cfg, params, jnp.asarray(seq), jnp.asarray(lens), cache,
                                       jnp.asarray(targets), jnp.asarray(at))
        out_lp, out_hit = np.asarray(out_lp), np.asarray(out_hit)
        for r, p in enumerate(preds):
            for i, (j, _) in enumerate(p):
                lp[r, j], hit[r, j] = out_lp[r, i], out_hit[r, i]
        if compacts:
            cache = compact(cache, press)
    return lp, hit, np.array([len(a) for a in answers])


def greedy(cfg, params, cache, press, questions: list, max_new_tokens: int, prompt_width: int,
           eos=()) -> list[list[int]]:
    """The ids each row generates greedily after its question on `cache` (donated), `press`
    compacting where `kvjax.generate(..., press=press)` compacts (EOS left out). Host-stepped,
    one token per call: every ratio of a base press shares its programs (generate compiles one
    per target size)."""
    B, eos = len(questions), set(eos)
    out, done = [[] for _ in range(B)], np.zeros(B, bool)

    def record(tok):
        for r in np.flatnonzero(~done):
            done[r] = int(tok[r]) in eos
            if not done[r]:
                out[r].append(int(tok[r]))
    if press is not None:
        cache = as_pressed(cache)
    seq, lens = as_tokens(questions, scoring.BUCKET, prompt_width)
    tok, cache = _next(cfg, params, jnp.asarray(seq), jnp.asarray(lens), cache)
    tok = np.asarray(tok)
    record(tok)
    for a, b, compacts in schedule(press, max_new_tokens - 1, prompt_width):
        for _ in range(a, b):                    # decode step i feeds generated token i
            if done.all():
                return out
            tok, cache = _next(cfg, params, jnp.asarray(tok[:, None].astype(np.int32)),
                               jnp.asarray((~done).astype(np.int32)), cache)
            tok = np.asarray(tok)
            record(tok)
        if compacts and not done.all():
            cache = compact(cache, press)
    return out


def agreement(ids: list, reference: list) -> float:
    """The share of `reference` reproduced by `ids` before they first differ (1.0: identical)."""
    if not reference:
        return 1.0
    n = next((i for i, (x, y) in enumerate(zip(ids, reference)) if x != y), min(len(ids), len(reference)))
    return n / len(reference)


def block(c, model: str, cfg, params, tok, task: str, length: int, samples: list, log) -> list:
    """Dense and every DecodingPress of `c.decoding_presses` at every ratio on one batch of a
    long-answer task: metric rows (module docstring); `log(row)` is called on each."""
    questions = [list(s.question_ids) for s in samples]
    answers = [list(s.answer_ids) for s in samples]
    tokens, lens = as_tokens([list(s.context_ids) for s in samples], width=bucket(max(len(s.context_ids)
                                                                                     for s in samples)))
    n, B = int(lens.max()), len(samples)
    width = bucket(max(len(q) for q in questions), scoring.BUCKET)
    new = bucket(max(len(a) for a in answers), 8) + 8          # greedy tokens: the longest answer and more
    slots = tokens.shape[1] + scoring.room(questions, answers, new)
    t0 = time.perf_counter()
    base = jax.block_until_ready(kvjax.prefill(cfg, params, tokens, lens,
                                               kvjax.init_cache(cfg, B, slots, hybrid=False))[1])
    prefill_s = time.perf_counter() - t0
    end = kvjax.cache_bytes(cfg, 1, n + max(len(q) + len(a) for q, a in zip(questions, answers)), hybrid=False)
    runs = [("dense", None, None)] + [(f"DecodingPress({b})", r, make_decoding_press(b, r, c.decoding_interval,
                                                                                     n, c))
                                      for b in c.decoding_presses for r in c.ratios]
    rows, reference = [], None
    for name, ratio, press in runs:
        t0 = time.perf_counter()
        with compile_watch() as w:
            lp, hit, alen = teacher_forced(cfg, params, _copy(base), press, questions, answers, width)
            ids = greedy(cfg, params, _copy(base), press, questions, new, width, model_eos_ids(tok, cfg.vocab_size))
        reference = ids if press is None else reference
        texts = [tok.decode(x) for x in ids]
        held = (P.cache_bytes(cfg, 1, [press.target_size + press.compression_interval] * cfg.num_layers)
                if press is not None else end)
        row = {"model": model, "length": length, "context_tokens": n, "task": task, "protocol": "decoding",
               "method": name, "family": "dense" if press is None else "decoding", "ratio": ratio,
               "cache": "full", "ratio_axis": 0.0 if press is None else float(ratio),
               "accuracy": float(np.mean([kvjax.ruler.exact_match(t, s) for t, s in zip(texts, samples)])),
               "answer_loglik": float(lp.sum(1).mean()), "answer_loglik_per_token": float(lp.sum() / alen.sum()),
               "token_accuracy": float(hit.sum() / alen.sum()),
               "agreement": float(np.mean([agreement(x, y) for x, y in zip(ids, reference)])),
               "copied": float(np.mean([agreement(x, y) for x, y in zip(ids, answers)])),
               "generated_tokens": float(np.mean([len(x) for x in ids])), "answer_tokens": float(alen.mean()),
               "target_size": None if press is None else press.target_size,
               "interval": None if press is None else press.compression_interval,
               "bytes": held, "bytes_vs_dense": held / end, "score_s": time.perf_counter() - t0,
               "compile_s": w.compile_s, "capture_s": prefill_s, "samples": B, "stacked": 1,
               "example": texts[0][:80]}
        rows.append(row)
        log(row)
    return rows


def _copy(cache):
    """A fresh copy of a cache (each run donates its own)."""
    return jax.tree.map(jnp.copy, cache)


def report(ctx, rows: list) -> None:
    """The long-generation table: per model, length and method."""
    mine = [r for r in rows if r["protocol"] == "decoding"]
    if mine:
        ctx.table("DecodingPress on a long generation (teacher-forced answer; greedy generation)",
                  ["model", "length", "task", "method", "ratio", "target", "memory vs dense", "answer log-lik / token",
                   "token accuracy", "copied (greedy)", "agreement with dense", "exact match"],
                  [[r["model"], r["length"], r["task"], r["method"], r["ratio"], r["target_size"], r["bytes_vs_dense"],
                    r["answer_loglik_per_token"], r["token_accuracy"], r["copied"], r["agreement"], r["accuracy"]]
                   for r in mine])
