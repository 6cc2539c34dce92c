"""Presses that wrap another press: AdaKV (head-wise budgets), CriticalKV (output-aware second
stage), ChunkKV (whole chunks), KeyRerotation (kept keys re-positioned).

Axis letters: B batch, T chunk tokens, K kv heads, N query heads, G = N / K, H head dim,
D model, L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..layers import rotate
from .base import Keep, LayerInputs, Press, ScorerPress, group_mean, n_kept, top_per_head

_FMAX = float(jnp.finfo(jnp.float32).max)


class Wrapper:
    """What a wrapper press takes from the press it wraps (field `press`)."""

    @property
    def compression_ratio(self):
        return self.press.compression_ratio

    @property
    def needs_attention(self):
        return self.press.needs_attention

    def check_lengths(self, n):
        self.press.check_lengths(n)


def _inner(press) -> ScorerPress:
    if not isinstance(press, ScorerPress):
        raise ValueError(f"this wrapper needs a scoring press (e.g. SnapKVPress), got "
                         f"{type(press).__name__}")
    return press


@dataclass(frozen=True)
class AdaKVPress(Wrapper, Press):
    """Head-wise budgets (Feng et al. 2024): each kv head keeps its `alpha_safeguard` share of the
    layer's budget for sure; the rest goes to the best scores across all heads of the layer.

    kvpress only masks the dropped keys (the cache keeps every token); here the kept tokens go
    into a pooled cache (see kvjax/cache/core.py): the layer's K heads share one pool of slots, each slot
    tagged with its head, so uneven budgets cost exactly the layer's K * n_kept slots.
    """
    press: ScorerPress = None
    alpha_safeguard: float = 0.2
    pooled = True

    def __post_init__(self):
        _inner(self.press)
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard!r}")

    def _counts(self, n):
        kept = n_kept(n, self.press.compression_ratio)
        safe = (kept * self.alpha_safeguard).astype(np.int32)
        if self.alpha_safeguard > 0:
            safe = np.where(kept > 0, np.maximum(1, safe), 0)
        return kept, safe.astype(np.int32)

    def host_budgets(self, n, cfg):
        kept, safe = self._counts(n)
        L = cfg.num_layers
        return {"n_kept": np.broadcast_to(kept, (L, len(kept))).copy(),
                "n_safe": np.broadcast_to(safe, (L, len(kept))).copy()}

    def kept_bound(self, n, cfg):
        """Pool slots per layer and row: K * n_kept (heads share them unevenly)."""
        kept, _ = self._counts(n)
        return np.broadcast_to(cfg.num_kv_heads * kept, (cfg.num_layers, len(kept))).copy()

    def keep(self, inp: LayerInputs) -> Keep:
        scores = self.press.score(inp)                                             # [B, K, T]
        B, K, T = scores.shape
        valid = inp.valid
        safe = top_per_head(scores, valid, inp.budget["n_safe"])
        s = jnp.where(safe, _FMAX, jnp.where(valid[:, None, :], scores.astype(jnp.float32), -jnp.inf))
        flat = s.reshape(B, 1, K * T)
        chosen = top_per_head(flat, jnp.ones((B, K * T), bool), K * inp.budget["n_kept"])
        return Keep(chosen.reshape(B, K, T) & valid[:, None, :])


def value_output_norm(inp: LayerInputs) -> jax.Array:
    """CriticalKV's ||v W_o||_1 per token, [B, K, T]: each query head's slice of the output
    projection applied to its kv head's value, L1 over the model dim, mean over the group."""
    B, T, K, H = inp.v.shape
    N = inp.q.shape[2]
    wo = inp.o_kernel.reshape(N, H, -1).astype(jnp.float32)                      # [N, H, D]
    v = jnp.repeat(inp.v.astype(jnp.float32), N // K, axis=2)                    # [B, T, N, H]
    proj = jnp.einsum("btnh,nhd->bntd", v, wo)
    return group_mean(jnp.abs(proj).sum(-1), K)


@dataclass(frozen=True)
class CriticalKVPress(Wrapper, ScorerPress):
    """Two stages (Feng et al. 2025): the wrapped press's top `first_stage_ratio` share of the
    budget is kept for sure; the rest goes to (score + epsilon) x ||v W_o||_1."""
    press: ScorerPress = None
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self):
        _inner(self.press)
        if not 0 <= self.first_stage_ratio <= 1:
            raise ValueError(f"first_stage_ratio must be in [0, 1], got {self.first_stage_ratio!r}")

    def host_budgets(self, n, cfg):
        r = self.press.compression_ratio
        stage1 = ((1 - r) * np.asarray(n, np.int64) * self.first_stage_ratio).astype(np.int64)
        if self.first_stage_ratio > 0:
            stage1 = np.maximum(1, stage1)
        L = cfg.num_layers
        out = ScorerPress.host_budgets(self.press, n, cfg)
        out["n_stage1"] = np.broadcast_to(stage1.astype(np.int32), (L, len(stage1))).copy()
        return out

    def score(self, inp: LayerInputs):
        scores = self.press.score(inp)
        first = top_per_head(scores, inp.valid, inp.budget["n_stage1"])
        scores = (scores + self.epsilon) * value_output_norm(inp)
        return jnp.where(first, _FMAX, scores)


@dataclass(frozen=True)
class ChunkKVPress(Wrapper, Press):
    """Keeps whole chunks of `chunk_length` tokens (Liu et al. 2025): a chunk's score is the
    wrapped press's score summed over kv heads and averaged over the chunk; every head keeps
    the same chunks."""
    press: ScorerPress = None
    chunk_length: int = 20

    def __post_init__(self):
        _inner(self.press)
        if not isinstance(self.chunk_length, int) or self.chunk_length < 1:
            raise ValueError(f"chunk_length must be an int >= 1, got {self.chunk_length!r}")

    def host_budgets(self, n, cfg):
        n = np.asarray(n, np.int64)
        chunks = -(-n // self.chunk_length)
        keep_chunks = np.maximum(1, (chunks * (1 - self.press.compression_ratio)).astype(np.int64))
        out = ScorerPress.host_budgets(self.press, n, cfg)       # rows with no whole chunk: the plain press
        out["n_chunks"] = np.broadcast_to(keep_chunks.astype(np.int32), out["n_kept"].shape).copy()
        return out

    def kept_bound(self, n, cfg):
        b = self.host_budgets(n, cfg)
        whole = np.minimum(np.asarray(n), b["n_chunks"] * self.chunk_length)
        return np.where(np.asarray(n) < self.chunk_length, b["n_kept"], whole)

    def keep(self, inp: LayerInputs) -> Keep:
        scores = self.press.score(inp)                                             # [B, K, T]
        B, K, T = scores.shape
        L = self.chunk_length
        C = -(-T // L)
        valid = inp.valid
        per_token = jnp.where(valid, scores.sum(1), 0.0)                            # [B, T]
        padded = jnp.pad(per_token, ((0, 0), (0, C * L - T))).reshape(B, C, L)
        counts = jnp.pad(valid, ((0, 0), (0, C * L - T))).reshape(B, C, L).sum(-1)
        chunk_scores = padded.sum(-1) / jnp.maximum(counts, 1)                      # [B, C]
        chunk_valid = counts > 0
        chosen = top_per_head(chunk_scores[:, None], chunk_valid, inp.budget["n_chunks"])[:, 0]   # [B, C]
        by_chunk = jnp.repeat(chosen, L, axis=1)[:, :T] & valid                     # [B, T]
        whole = jnp.broadcast_to(by_chunk[:, None], (B, K, T))
        plain = top_per_head(scores, valid, inp.budget["n_kept"])
        has_chunk = (inp.lengths >= L)[:, None, None]
        return Keep(jnp.where(has_chunk, whole, plain))


@dataclass(frozen=True)
class KeyRerotationPress(Wrapper, Press):
    """The wrapped press's selection, with the kept keys re-rotated to consecutive positions
    0..n_kept-1 (order kept) and the next token continuing at n_kept (kvpress's
    KeyRerotationPress; StreamingLLM's cache positions)."""
    press: ScorerPress = None
    needs_rotary = True

    def __post_init__(self):
        _inner(self.press)

    def host_budgets(self, n, cfg):
        return self.press.host_budgets(n, cfg)

    def keep(self, inp: LayerInputs) -> Keep:
        mask = self.press.keep(inp).mask                                           # [B, K, T]
        start = inp.positions[:, :1]                                               # [B, 1] chunk start
        new_pos = start[:, None] + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1     # [B, K, T]
        old_pos = inp.positions[:, None, :]
        delta = jnp.where(mask, new_pos - old_pos, 0).astype(jnp.float32)
        inv = inp.inv_freq if inp.inv_freq.ndim == 2 else inp.inv_freq[None]       # [B or 1, R/2]
        ang = delta[..., None] * inv[:, None, None, :]                               # [B, K, T, R/2]
        k = jnp.swapaxes(inp.k, 1, 2)                                              # [B, K, T, H]
        rotated = jnp.swapaxes(rotate(k, jnp.cos(ang), jnp.sin(ang)), 1, 2)
        next_position = start[:, 0] + mask.sum(-1).max(-1).astype(jnp.int32)
        return Keep(mask, keys=rotated, positions=jnp.where(mask, new_pos, -1), next_position=next_position)
