"""Scoring a generated answer against a `Sample`, and the teacher-forced answer likelihood.

Normalisation (`normalize`): Unicode NFKC, case-folded, whitespace runs collapsed to one
space, and quotes, backticks, asterisks and the punctuation `.,;:!?` stripped from both ends.

`exact_match(generated, sample)`: only the generated text's first non-empty line counts (a
base model runs on past its answer). A single answer matches when that line, normalised,
equals the answer normalised. A list answer (several numbers, variables or words) matches
when every item is present in the line as a whole item: the line is split on commas,
semicolons, whitespace and the word "and", and each piece normalised; extra items do not
count against it and order does not matter.

`string_match(generated, sample)`: RULER's string_match_all: the fraction of the answer's
items that occur, case-folded, anywhere in the generated text (lenient; for a chat model
that answers in a sentence).

Teacher-forced likelihood: `token_logprobs(logits, targets)` gives log p(target_i | ...)
from logits whose row i predicts targets[i] (log-softmax in float64), and
`answer_loglik(logprobs)` their sum (the answer's log-likelihood) and mean (per token).
See `Sample.inputs` for which logits predict the answer under each protocol.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_STRIP = "\"'`*.,;:!? \u201c\u201d\u2018\u2019"
_SPLIT = re.compile(r"[,;\s]+|\band\b")


def casefold_nfkc(text: str) -> str:
    """NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def normalize(text: str) -> str:
    """The comparison form of a text (module docstring)."""
    return re.sub(r"\s+", " ", casefold_nfkc(text)).strip(_STRIP)


def first_line(text: str) -> str:
    """The first line of `text` that is not blank ("" if none)."""
    return next((line for line in text.splitlines() if line.strip()), "")


def exact_match(generated: str, sample) -> bool:
    """Whether `generated` answers `sample` (module docstring)."""
    if not isinstance(generated, str):
        raise TypeError(f"generated must be a str, got {type(generated).__name__}")
    line = first_line(generated)
    if not sample.is_list:
        return normalize(line) == normalize(sample.answer_text)
    items = {normalize(p) for p in _SPLIT.split(casefold_nfkc(line)) if p and normalize(p)}
    return all(normalize(a) in items for a in sample.answers)


def string_match(generated: str, sample) -> float:
    """RULER's string_match_all: the fraction of answer items found in `generated` (case-folded)."""
    if not isinstance(generated, str):
        raise TypeError(f"generated must be a str, got {type(generated).__name__}")
    text = casefold_nfkc(generated)
    return sum(casefold_nfkc(a) in text for a in sample.answers) / len(sample.answers)


@dataclass(frozen=True)
class AnswerLoglik:
    """log p(answer | prompt) under teacher forcing: `sum` over the answer's tokens, `mean`
    per token, `n_tokens`."""
    sum: float
    mean: float
    n_tokens: int


def token_logprobs(logits, targets) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each i: logits [N, V] (any float dtype; computed
    in float64), targets [N] ints -> float64 [N]."""
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or t.shape != (x.shape[0],):
        raise ValueError(f"logits must be [N, V] and targets [N]; got {x.shape} and {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= x.shape[1]):
        raise ValueError(f"targets must be ids in [0, {x.shape[1]}), got {t.min()}..{t.max()}")
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return x[np.arange(len(t)), t] - lse


def answer_loglik(logprobs) -> AnswerLoglik:
    """Sum and mean of the per-token log-probabilities of the answer's ids."""
    lp = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if lp.size == 0:
        raise ValueError("no answer log-probabilities: the answer has at least one token")
    if not np.all(np.isfinite(lp) | (lp == -np.inf)) or np.any(lp > 1e-6):
        raise ValueError("log-probabilities must be <= 0 (or -inf) and not NaN")
    return AnswerLoglik(float(lp.sum()), float(lp.mean()), int(lp.size))
