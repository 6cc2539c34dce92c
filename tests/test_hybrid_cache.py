"""Hybrid caches: a ring of `window` slots on windowed layers, max_len slots on full ones.

Oracles: the same model with a full cache on every layer (hybrid=False, the window applied
as a mask), the no-cache path, and `kvjax.forward` (masked attention over the whole
sequence). A Gemma-2-like pattern (sliding, full, sliding) on llama-tiny's shapes keeps
the test independent of any one family's other features.
"""
import jax
import numpy as np
import pytest

import kvjax
from kvjax.cache import layer_rings

from conftest import INIT_STD

W = 4                      # window of the sliding layers
B, S, N = 3, 10, 3 * W + 2  # generation runs three windows past the prompt
LENS = np.array([10, 6, 2], np.int32)


@pytest.fixture(scope="module")
def model():
    cfg = kvjax.ModelConfig.preset("llama-tiny").replace(
        num_layers=3, sliding_window=W, layer_types=("sliding", "full", "sliding"), name="hybrid-tiny")
    return cfg, kvjax.init_params(cfg, jax.random.key(3), std=INIT_STD)


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, 320, (B, S), dtype=np.int32)


@pytest.mark.parametrize("kind", ["dense", "int8"])
@pytest.mark.parametrize("max_len", [3, W, W + 1, 40])
def test_bytes_are_exact_and_rings_only_where_the_window_is_shorter(model, kind, max_len):
    cfg, _ = model
    cache = kvjax.init_cache(cfg, 2, max_len, kind=kind)
    assert cache.nbytes == kvjax.cache_bytes(cfg, 2, max_len, kind=kind)
    want = (W, 0, W) if max_len > W else ()
    assert cache.rings == want
    assert [k.shape[2] for k in cache.keys] == [r or max_len for r in (want or (0, 0, 0))]
    full = kvjax.init_cache(cfg, 2, max_len, kind=kind, hybrid=False)
    assert full.rings == () and full.nbytes == kvjax.cache_bytes(cfg, 2, max_len, kind=kind, hybrid=False)
    if max_len == 40:   # two of three layers hold 4 slots instead of 40
        per_slot = (full.nbytes - 8) / (3 * 40)
        assert cache.nbytes == pytest.approx(per_slot * (40 + 2 * W) + 8 + 2 * W * 4)


def test_hybrid_option_errors_name_the_reason(model):
    cfg, _ = model
    with pytest.raises(ValueError, match="no layer of 'llama-tiny' has a window shorter than max_len=16"):
        kvjax.init_cache(kvjax.ModelConfig.preset("llama-tiny"), 1, 16, hybrid=True)
    with pytest.raises(ValueError, match="'kivi' cache has one layout"):
        layer_rings(cfg, 256, "kivi", hybrid=True)
    assert layer_rings(cfg, 256, "window") == ()         # a window cache is a ring everywhere already
    assert layer_rings(cfg, 256, "dense") == (W, 0, W)


@pytest.mark.parametrize("kind", ["dense", "int8"])
def test_generate_equals_the_full_cache_and_no_cache_three_windows_past(model, prompts, kind):
    cfg, params = model
    hybrid = kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=N, cache_kind=kind)
    assert hybrid.cache.rings == (W, 0, W)
    full = kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=N, cache_kind=kind, hybrid=False)
    np.testing.assert_array_equal(np.asarray(hybrid.tokens), np.asarray(full.tokens))
    if kind == "dense":
        nocache = kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=N, use_cache=False)
        np.testing.assert_array_equal(np.asarray(hybrid.tokens), np.asarray(nocache.tokens))
    assert hybrid.cache.nbytes < full.cache.nbytes


def test_decode_steps_match_masked_attention_over_the_whole_sequence(model, prompts):
    """Each step's logits equal `forward` (masked attention, no cache) at that position."""
    cfg, params = model
    seq = np.concatenate([prompts, np.random.default_rng(1).integers(0, 320, (B, N), dtype=np.int32)], 1)
    cache = kvjax.init_cache(cfg, B, S + N)
    logits, cache = kvjax.prefill(cfg, params, prompts, LENS, cache)
    ref = np.asarray(kvjax.forward(cfg, params, seq, LENS + N))   # row b: seq[b, :LENS[b] + N]
    got = [np.asarray(logits)]
    for i in range(N):
        logits, cache = kvjax.decode_step(cfg, params, seq[np.arange(B), LENS + i], cache)
        got.append(np.asarray(logits))
    for i, step in enumerate(got):
        np.testing.assert_allclose(step, ref[np.arange(B), LENS - 1 + i], atol=2e-4, rtol=0)
    assert int(np.asarray(cache.slot_pos).max()) == int((LENS + N).max()) - 1   # the ring wrapped


def test_multi_turn_and_save_load_continue_exactly(model, prompts, tmp_path):
    """A second turn longer than the ring (prefill of a chunk wider than W), then a saved and
    reloaded cache continuing: the same tokens as with a full cache on every layer."""
    cfg, params = model
    turn2 = np.random.default_rng(2).integers(0, 320, (B, 2 * W + 1), dtype=np.int32)
    lens2 = np.array([2 * W + 1, 1, W], np.int32)
    outs = {}
    for hybrid in (None, False):
        first = kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=W, max_len=64, hybrid=hybrid)
        second = kvjax.generate(cfg, params, turn2, lens2, max_new_tokens=W, cache=first.cache)
        path = kvjax.save_cache(tmp_path / f"c{hybrid}.npz", second.cache, cfg)
        loaded = kvjax.load_cache(path, cfg)
        assert loaded.rings == second.cache.rings
        third = kvjax.generate(cfg, params, prompts[:, :3], np.full(B, 3, np.int32), max_new_tokens=W,
                               cache=loaded)
        outs[hybrid] = [np.asarray(o.tokens) for o in (first, second, third)]
    for a, b in zip(outs[None], outs[False]):
        np.testing.assert_array_equal(a, b)


def test_generate_with_a_press_picks_a_full_cache(model, prompts):
    """generate(press=...) without a cache presses every layer, as kvpress does (hybrid=False);
    a press on a hybrid cache (its full layers only) is tests/test_hybrid_press.py's."""
    from kvjax import press

    cfg, params = model
    p = press.KnormPress(compression_ratio=0.5)
    out = kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=2, press=p)
    assert not out.cache.hybrid and out.cache.pressed
    # a pressed cache has max_len slots on every layer, windowed model or not
    assert out.cache.nbytes == kvjax.cache_bytes(cfg, B, S + 2, pressed=True, hybrid=False)
    sized = press.init_cache(cfg, B, S, p, room=2)          # per-layer budgets, never rings
    assert not sized.hybrid and sized.nbytes == press.cache_bytes(cfg, B, [k.shape[2] for k in sized.keys])


def test_a_model_windowed_on_every_layer_gets_rings_everywhere_and_runs_past_max_len():
    cfg = kvjax.ModelConfig.preset("mistral-tiny")               # window 8 on both layers
    params = kvjax.init_params(cfg, jax.random.key(0), std=INIT_STD)
    prompts = np.random.default_rng(4).integers(0, 320, (2, 12), dtype=np.int32)
    lens = np.array([12, 5], np.int32)
    cache = kvjax.init_cache(cfg, 2, 16)
    assert cache.rings == (8, 8) and cache.all_rings and not cache.bounded and cache.max_len == 8
    ring = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=20, cache=cache)   # 32 > 16 tokens
    full = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=20, hybrid=False)
    np.testing.assert_array_equal(np.asarray(ring.tokens), np.asarray(full.tokens))
