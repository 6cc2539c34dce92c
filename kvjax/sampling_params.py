"""Sampling settings on the host (NumPy only: the engine's scheduler imports it without JAX):
the error a bad setting raises, the range checks of the logit controls, their defaults, the
dense per-row arrays a batch sends to the device and the rows' generated-token counts. The
rules themselves run on the device: kvjax/controls.py (and kvjax/sampling.py for
temperature, top-k, top-p and min_p).

Axis letters: B rows, V vocabulary.
"""
from __future__ import annotations

import numpy as np

INT32_MAX = 2**31 - 1   # top_k and min_tokens live in int32 arrays on the device


class SamplingError(ValueError):
    """A sampling parameter out of range; `param` names it (the server answers it with a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_PENALTY = 2.0                     # OpenAI's bound on presence / frequency penalties
MAX_BIAS = 100.0                      # OpenAI's bound on a logit bias
MIN_REPETITION, MAX_REPETITION = 1e-5, 1e5   # logits / r stays finite in float32


def _bounded(name: str, value, low: float, high: float, where: str):
    pre = f"{where}: " if where else ""
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SamplingError(name, f"{pre}{name} must be a number, got {value!r}") from None
    if not np.isfinite(arr).all() or (arr < low).any() or (arr > high).any():
        raise SamplingError(name, f"{pre}{name} must be in [{low:g}, {high:g}], got {value!r}")


def check_logit_bias(logit_bias: dict, vocab_size: int, where: str = "") -> dict:
    """{token id: bias} with int ids in [0, vocab_size) and finite biases in [-100, 100] ->
    {int: float}; SamplingError("logit_bias", ...) naming the offending entry otherwise."""
    pre = f"{where}: " if where else ""
    if not isinstance(logit_bias, dict):
        raise SamplingError("logit_bias", f"{pre}logit_bias must be a dict of token id -> bias, "
                                          f"got {type(logit_bias).__name__}")
    out = {}
    for tok, bias in logit_bias.items():
        if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or not 0 <= tok < vocab_size:
            raise SamplingError("logit_bias", f"{pre}logit_bias token {tok!r} is not a token id in "
                                              f"[0, {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.number)) or \
                not abs(bias) <= MAX_BIAS:          # (NaN fails too; a huge int compares exactly)
            raise SamplingError("logit_bias", f"{pre}logit_bias for token {tok} must be a number in "
                                              f"[-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias!r}")
        out[int(tok)] = float(bias)
    return out


def check_controls(vocab_size: int, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                   logit_bias=None, min_p=0.0, min_tokens=0, max_tokens=None, where: str = "") -> None:
    """The one range check of the logit controls (scalars or per-row arrays; logit_bias a dict,
    or one dict per row), used by `generate`, `Engine` and `kvjax serve`. Raises SamplingError
    naming the parameter, its value and the limit."""
    pre = f"{where}: " if where else ""
    _bounded("presence_penalty", presence_penalty, -MAX_PENALTY, MAX_PENALTY, where)
    _bounded("frequency_penalty", frequency_penalty, -MAX_PENALTY, MAX_PENALTY, where)
    _bounded("repetition_penalty", repetition_penalty, MIN_REPETITION, MAX_REPETITION, where)
    _bounded("min_p", min_p, 0.0, 1.0, where)
    m = np.asarray(min_tokens, dtype=object if isinstance(min_tokens, int) else None)
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in m.flat)
    if not ints or (m < 0).any() or (m > INT32_MAX).any():
        raise SamplingError("min_tokens", f"{pre}min_tokens must be an int in [0, {INT32_MAX}], "
                                          f"got {min_tokens!r}")
    if max_tokens is not None and (m > np.asarray(max_tokens)).any():
        raise SamplingError("min_tokens", f"{pre}min_tokens ({min_tokens!r}) must be at most max_tokens "
                                          f"({max_tokens!r})")
    if logit_bias is not None:
        for d in ([logit_bias] if isinstance(logit_bias, dict) else logit_bias):
            if d is not None:
                check_logit_bias(d, vocab_size, where)


DEFAULTS = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
                min_p=0.0, min_tokens=0)


def is_default(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
               min_p=0.0, min_tokens=0) -> bool:
    """Whether these settings leave every logit as it is (so no Controls are needed)."""
    return (np.all(np.asarray(presence_penalty) == 0) and np.all(np.asarray(frequency_penalty) == 0)
            and np.all(np.asarray(repetition_penalty) == 1) and np.all(np.asarray(min_p) == 0)
            and np.all(np.asarray(min_tokens) == 0) and not _any_bias(logit_bias))


def _any_bias(logit_bias) -> bool:
    if logit_bias is None:
        return False
    if isinstance(logit_bias, dict):
        return bool(logit_bias)
    return any(bool(d) for d in logit_bias)


def host_controls(vocab_size: int, batch_size: int, prompts=None, presence_penalty=0.0, frequency_penalty=0.0,
                  repetition_penalty=1.0, logit_bias=None, min_p=0.0, min_tokens=0) -> dict:
    """The Controls' arrays on the host (NumPy) for B rows from scalars or per-row values.

    prompts: per row, the token ids seen before generation (for the repetition penalty), or
    None; logit_bias: None, one dict for every row, or one dict (or None) per row."""
    B, V = batch_size, vocab_size
    rows = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (B,)).copy()  # noqa: E731
    bias = np.zeros((B, V), np.float32)
    per_row = [logit_bias] * B if logit_bias is None or isinstance(logit_bias, dict) else list(logit_bias)
    for b, d in enumerate(per_row):
        for tok, v in (d or {}).items():
            bias[b, int(tok)] = v
    prompt = np.zeros((B, V), bool)
    for b, ids in enumerate(prompts if prompts is not None else []):
        prompt[b, np.asarray(ids, np.int64)] = True
    return dict(presence=rows(presence_penalty, np.float32), frequency=rows(frequency_penalty, np.float32),
                repetition=rows(repetition_penalty, np.float32), min_p=rows(min_p, np.float32),
                min_tokens=rows(min_tokens, np.int32), bias=bias, prompt=prompt)


def token_counts(generated, vocab_size: int) -> np.ndarray:
    """int32 [B, V]: how often each row generated each token (rows: lists of ids)."""
    counts = np.zeros((len(generated), vocab_size), np.int32)
    for b, ids in enumerate(generated):
        if len(ids):
            counts[b] = np.bincount(np.asarray(ids, np.int64), minlength=vocab_size)[:vocab_size]
    return counts
