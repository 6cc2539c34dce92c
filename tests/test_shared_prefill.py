"""The shared-prefill path (kvjax/decode/shared.py): one capture of a context, every press
applied to it, equal to `kvjax.prefill(..., press=p)` for each press: the same kept
positions, the same cache contents, the same last-token logits, and the same tokens when
generation continues from either cache."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import kvjax
from kvjax import press as P
from kvjax.decode.shared import apply_press, capture

B, T, ROOM = 3, 40, 8
PRESSES = {
    "Knorm": P.KnormPress(0.5),
    "KeyDiff": P.KeyDiffPress(0.5),
    "StreamingLLM": P.StreamingLLMPress(0.5, n_sink=2),
    "Random": P.RandomPress(0.5, seed=3),
    "SnapKV": P.SnapKVPress(0.5, window_size=4, kernel_size=3),
    "PyramidKV": P.PyramidKVPress(0.25, window_size=4, kernel_size=3),
    "TOVA": P.TOVAPress(0.75),
    "ObservedAttention": P.ObservedAttentionPress(0.5),
    "ExpectedAttention": P.ExpectedAttentionPress(0.5, n_future_positions=8, n_sink=2),
    "AdaKV(ExpectedAttention)": P.AdaKVPress(P.ExpectedAttentionPress(0.5, n_future_positions=8, n_sink=2)),
    "CriticalKV(SnapKV)": P.CriticalKVPress(P.SnapKVPress(0.5, window_size=4, kernel_size=3)),
    "ChunkKV(SnapKV)": P.ChunkKVPress(P.SnapKVPress(0.5, window_size=4, kernel_size=3), chunk_length=4),
    "KeyRerotation(StreamingLLM)": P.KeyRerotationPress(P.StreamingLLMPress(0.5, n_sink=2)),
}


@pytest.fixture(scope="module")
def setup():
    cfg = kvjax.ModelConfig.preset("llama-tiny").replace(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                                                          head_dim=16, mlp_dim=128, vocab_size=97)
    params = kvjax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
    lens = np.array([T, 29, 17], np.int32)          # right-padded rows of different lengths
    return cfg, params, tokens, lens, capture(cfg, params, tokens, lens)


def _run_cache(cfg, press):
    """One shape for every press (T + ROOM slots per layer; a pool for AdaKV): the continuation's
    generate compiles once per layout, not once per press."""
    if getattr(press, "pooled", False):
        return kvjax.init_cache(cfg, B, T + ROOM, hybrid=False)
    return P.pressed_cache(cfg, B, [T + ROOM] * cfg.num_layers)


def _continue(cfg, params, cache, n=6):
    prompt = np.full((B, 2), 5, np.int32)
    return np.asarray(kvjax.generate(cfg, params, prompt, np.array([2, 1, 2], np.int32), max_new_tokens=n,
                                     cache=cache).tokens)


@pytest.mark.parametrize("name", list(PRESSES))
def test_shared_prefill_equals_a_pressed_prefill(setup, name):
    cfg, params, tokens, lens, pre = setup
    press = PRESSES[name]
    want_logits, want = kvjax.prefill(cfg, params, tokens, lens, _run_cache(cfg, press), press=press)
    got = apply_press(cfg, pre, press, _run_cache(cfg, press))
    np.testing.assert_allclose(np.asarray(pre.logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    for layer, (g, w) in enumerate(zip(P.kept_positions(got), P.kept_positions(want))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{name} layer {layer}")
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    for g, w in zip(got.keys + got.values, want.keys + want.values):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    kept = sum(int((np.asarray(p) >= 0).sum()) for p in P.kept_positions(got))
    assert kept < 2 * cfg.num_kv_heads * int(lens.sum())          # the press dropped tokens
    np.testing.assert_array_equal(_continue(cfg, params, got), _continue(cfg, params, want))


def test_no_press_gives_the_dense_prefill(setup):
    cfg, params, tokens, lens, pre = setup
    got = apply_press(cfg, pre, None, P.pressed_cache(cfg, B, [T + ROOM] * cfg.num_layers))
    _, want = kvjax.prefill(cfg, params, tokens, lens, kvjax.init_cache(cfg, B, T + ROOM))
    for g, w in zip(P.kept_positions(got), P.kept_positions(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(_continue(cfg, params, got), _continue(cfg, params, want))


def test_refusals_name_the_problem(setup):
    cfg, params, tokens, lens, pre = setup
    no_attn = capture(cfg, params, tokens, lens, attention=False)
    with pytest.raises(ValueError, match="attention=True"):
        apply_press(cfg, no_attn, P.ObservedAttentionPress(0.5), kvjax.init_cache(cfg, B, T))
    kvzip = P.KVzipPress(0.5, prefix_length=1, repeat_ids=(1,), repeat_part_ids=(1,), suffix_ids=(1,))
    with pytest.raises(ValueError, match="model passes of its own"):
        apply_press(cfg, pre, kvzip, kvjax.init_cache(cfg, B, T))
    with pytest.raises(ValueError, match="batch size 1"):
        apply_press(cfg, pre, P.KnormPress(0.5), kvjax.init_cache(cfg, 1, T))
    _, full = kvjax.prefill(cfg, params, tokens, lens, kvjax.init_cache(cfg, B, T + ROOM))
    with pytest.raises(ValueError, match="must be\\s+empty"):
        apply_press(cfg, pre, P.KnormPress(0.5), full)
    with pytest.raises(ValueError, match="slots"):
        apply_press(cfg, pre, P.KnormPress(0.1), kvjax.init_cache(cfg, B, 8))


@pytest.mark.parametrize("name", ["SnapKV", "ObservedAttention", "Knorm"])
def test_shared_prefill_on_a_hybrid_cache(name):
    """Gemma-3-like layers (sliding, full, sliding; window 8) on the default hybrid cache: the
    full layer pressed, the rings as a prefill leaves them; equal to prefill(..., press=p)."""
    from conftest import INIT_STD

    cfg = kvjax.ModelConfig.preset("gemma3-tiny").replace(num_layers=3, layer_types=("sliding", "full", "sliding"),
                                                          dtype="float32")
    params = kvjax.init_params(cfg, jax.random.key(5), std=INIT_STD)
    rng = np.random.default_rng(7)
    tokens, lens = rng.integers(0, 320, (2, 24)).astype(np.int32), np.array([24, 19], np.int32)
    press = PRESSES[name]
    _, want = kvjax.prefill(cfg, params, tokens, lens, kvjax.init_cache(cfg, 2, 40), press=press)
    got = apply_press(cfg, capture(cfg, params, tokens, lens), press, kvjax.init_cache(cfg, 2, 40))
    assert got.hybrid and got.pressed and got.rings == want.rings == (8, 0, 8)
    np.testing.assert_array_equal(np.asarray(got.slot_pos), np.asarray(want.slot_pos))
    np.testing.assert_array_equal(np.asarray(got.head_pos[1]), np.asarray(want.head_pos[1]))
    np.testing.assert_array_equal(np.asarray(got.head_fill[1]), np.asarray(want.head_fill[1]))
    for g, w in zip(got.keys + got.values, want.keys + want.values):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    q = np.full((2, 3), 7, np.int32)
    np.testing.assert_array_equal(
        np.asarray(kvjax.generate(cfg, params, q, np.array([3, 2], np.int32), max_new_tokens=5, cache=got).tokens),
        np.asarray(kvjax.generate(cfg, params, q, np.array([3, 2], np.int32), max_new_tokens=5, cache=want).tokens))
