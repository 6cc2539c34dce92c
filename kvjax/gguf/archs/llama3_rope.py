"""Llama 3.1-style rope scaling from a GGUF `rope_freqs.weight` tensor.

llama.cpp's converter (LlamaModel.generate_extra_tensors) does not store Hugging Face's
rope_scaling {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings}; it stores the E/2 per-frequency divisors the formula
gives (llama.cpp divides each inverse frequency theta ** (-2i/E) by factor_i):

    wavelen_i = 2 pi theta ** (2i/E)
    factor_i  = 1                           if wavelen_i < L / high
              = factor                      if wavelen_i > L / low
              = 1 / ((1 - s_i) / factor + s_i),  s_i = (L / wavelen_i - low) / (high - low)

The factors fix `factor` (the largest) and the two band edges L / low and L / high (a line
through the smoothed band: s_i is linear in 1 / wavelen_i), but not L, low and high apart
(scaling all three by c gives the same factors, and the same model). kvjax therefore tries,
in order: the converter's defaults (low 1, high 4, L 8192, the Llama 3.1/3.2/3.3 values),
then low = 1 with L the band's low edge and high rounded, then the unrounded edges; the
first that reproduces every stored factor (to 1e-5 relative: float32 rounding of the
converter's own arithmetic) is the rope_scaling. Factors the formula cannot produce raise
CheckpointError.
"""
from __future__ import annotations

import math

import numpy as np

from ...hf.common import CheckpointError
from . import base

ROPE_FREQS = "rope_freqs.weight"
RTOL = 1e-5


def converter_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                      original: float) -> np.ndarray:
    """The [E/2] float32 factors llama.cpp's converter writes for these llama3 parameters
    (its float32 arithmetic, per frequency)."""
    inv = (np.float32(1.0) / np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                   / np.float32(head_dim)))
    wavelen = np.float32(2 * math.pi) / inv
    smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
    mid = np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth)
    out = np.where(wavelen < original / high, np.float32(1),
                   np.where(wavelen > original / low, np.float32(factor), mid))
    return out.astype(np.float32)


def _rounded(x: float) -> float:
    """x at the fewest decimals that stay within 1e-6 relative (4.0000003 -> 4.0)."""
    for digits in range(7):
        if abs(round(x, digits) - x) <= 1e-6 * abs(x):
            return round(x, digits)
    return x


def _band_edges(factors: np.ndarray, theta: float, head_dim: int) -> tuple | None:
    """(L / low, L / high) from a line through the smoothed band (None: under two points)."""
    f = float(factors.max())
    mid = (np.abs(factors - 1) > RTOL) & (np.abs(factors - f) > RTOL * f)
    if mid.sum() < 2:
        return None
    i = np.arange(0, head_dim, 2, dtype=np.float64)[mid]
    x = 1.0 / (2 * math.pi * float(theta) ** (i / head_dim))        # 1 / wavelen
    s = (1.0 / factors[mid].astype(np.float64) - 1.0 / f) / (1.0 - 1.0 / f)
    slope, icept = np.polyfit(x, s, 1)   # s = (L x - low) / (high - low)
    if icept >= 0:   # low <= 0: not a llama3 band
        return None
    return -slope / icept, slope / (1.0 - icept)


def _candidates(factors: np.ndarray, theta: float, head_dim: int):
    f = base.f32(factors.max())
    yield f, 1.0, 4.0, 8192
    edges = _band_edges(factors, theta, head_dim)
    if edges is not None:
        low_edge, high_edge = edges
        original = int(round(low_edge))
        yield f, 1.0, _rounded(original / high_edge), original
        yield f, original / low_edge, original / high_edge, original


def llama3_scaling(g, theta: float, head_dim: int) -> dict | None:
    """Hugging Face rope_scaling (rope_type llama3) whose factors are the file's
    rope_freqs.weight; None when every factor is 1. CheckpointError otherwise."""
    factors = base.small_tensor(g, ROPE_FREQS)
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{g.path}: tensor {ROPE_FREQS!r} has {factors.size} factors; "
                              f"head_dim={head_dim} needs {head_dim // 2}")
    if np.all(factors == 1):
        return None
    for f, low, high, original in _candidates(factors, theta, head_dim):
        if f > 1 and high > low > 0 and np.allclose(
                converter_factors(theta, head_dim, f, low, high, original), factors, rtol=RTOL, atol=0):
            return {"rope_type": "llama3", "factor": f, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    raise CheckpointError(
        f"{g.path}: tensor {ROPE_FREQS!r} holds per-frequency rotary factors that llama3 rope "
        f"scaling (factor, low/high_freq_factor, original_max_position_embeddings) does not "
        f"produce; kvjax reads rope_freqs only as Llama 3.1-style scaling")
