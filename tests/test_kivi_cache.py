"""The kivi cache kind through every entry point (kvjax/kivi.py holds the storage and its own tests).

With a residual as long as the whole sequence nothing is quantised, so the kivi cache must
equal the dense cache to float32 rounding (1e-4 on logits of order 5): this checks positions,
masks, ragged rows and turns. With quantisation, the stored keys and values must be the
dense ones within the quantisation step, and 4 bits must be closer than 2.
"""
import jax
import numpy as np
import pytest

import kvjax
from kvjax.cache import kivi
from kvjax.cache import layer_arrays


@pytest.fixture(scope="module")
def tiny():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    return cfg, kvjax.init_params(cfg, jax.random.key(0), std=0.2)


def _prompts(cfg):
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.vocab_size, (2, 40)).astype(np.int32), np.array([40, 29])


def test_unquantised_kivi_equals_dense_everywhere(tiny):
    cfg, params = tiny
    toks, lens = _prompts(cfg)
    kw = dict(kind="kivi", bits=2, group_size=8, residual_length=128)
    out = kvjax.generate(cfg, params, toks, lens, max_new_tokens=20, max_len=128, cache_kind="kivi",
                         bits=2, group_size=8, residual_length=128)
    ref = kvjax.generate(cfg, params, toks, lens, max_new_tokens=20, max_len=128)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    # a second turn (multi-turn prefill) and single steps continue both identically
    turn = toks[:, :5]
    la, a = kvjax.prefill(cfg, params, turn, [5, 3], out.cache)
    lb, b = kvjax.prefill(cfg, params, turn, [5, 3], ref.cache)
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-4)
    la, a = kvjax.decode_step(cfg, params, np.asarray(la).argmax(-1), a)
    lb, b = kvjax.decode_step(cfg, params, np.asarray(lb).argmax(-1), b)
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-4)
    assert a.nbytes == kvjax.cache_bytes(cfg, 2, 128, **kw)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantised_store_matches_dense_within_a_step(tiny, bits, tmp_path):
    cfg, params = tiny
    toks, lens = _prompts(cfg)
    q = dict(bits=bits, group_size=8, residual_length=16)
    cache = kvjax.init_cache(cfg, 2, 64, kind="kivi", **q)
    _, cache = kvjax.prefill(cfg, params, toks, lens, cache)
    _, dense = kvjax.prefill(cfg, params, toks, lens, kvjax.init_cache(cfg, 2, 64))
    k, v, pos, valid = kivi.read(layer_arrays(cache, 0), cache.lengths, jax.numpy.float32, bits, 8, 16)
    k, v, pos, valid = map(np.asarray, (k, v, pos, valid))
    dk, dv = np.asarray(dense.keys[0]), np.asarray(dense.values[0])
    b, s = np.nonzero(valid)
    assert len(b) == lens.sum()                                 # every token stored exactly once
    assert sorted(zip(b, pos[b, s])) == sorted((r, p) for r in range(2) for p in range(lens[r]))
    key_err = np.abs(k[b, :, s] - dk[b, :, pos[b, s]]).max()
    val_err = np.abs(v[b, :, s] - dv[b, :, pos[b, s]]).max()
    span = max(np.ptp(dk), np.ptp(dv))
    assert key_err <= span / (2 ** bits - 1) and val_err <= span / (2 ** bits - 1)
    assert np.abs(k[b, :, s] - dk[b, :, pos[b, s]]).mean() > 0     # really quantised
    # save/load round trip keeps every array and the settings
    kvjax.save_cache(tmp_path / "kivi.npz", cache, cfg)
    back = kvjax.load_cache(tmp_path / "kivi.npz", cfg)
    assert back.kind == "kivi" and back.quant == (bits, 8, 16) and back.nbytes == cache.nbytes
    o1 = kvjax.generate(cfg, params, toks[:, :3], [3, 3], max_new_tokens=4, cache=back)
    assert o1.tokens.shape == (2, 4)


def test_two_bit_is_about_an_eighth_of_bf16(tiny):
    cfg = kvjax.ModelConfig.preset("llama-1b")                # head_dim 64
    kw = dict(kind="kivi", group_size=32, residual_length=128, dtype="bfloat16")
    dense = kvjax.cache_bytes(cfg, 1, 4096, dtype="bfloat16")
    two = kvjax.cache_bytes(cfg, 1, 4096, bits=2, **kw)
    four = kvjax.cache_bytes(cfg, 1, 4096, bits=4, **kw)
    assert 0.15 < two / dense < 0.30 and two < four < dense / 2


def test_kivi_errors_name_the_value(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"bits"):
        kvjax.init_cache(cfg, 1, 128, kind="kivi", bits=3)
    with pytest.raises(ValueError, match=r"100"):
        kvjax.init_cache(cfg, 1, 100, kind="kivi", residual_length=32, group_size=8)
    with pytest.raises(ValueError, match=r"bits/group_size/residual_length are KIVI settings"):
        kvjax.init_cache(cfg, 1, 128, bits=2)
    cache = kvjax.init_cache(cfg, 1, 32, kind="kivi", group_size=8, residual_length=16)
    with pytest.raises(ValueError, match=r"needs 40 cache slots .* max_len is 32"):
        kvjax.prefill(cfg, params, np.zeros((1, 40), np.int32), [40], cache)
    from kvjax import press
    with pytest.raises(ValueError, match=r"this cache is kind 'kivi'"):
        kvjax.prefill(cfg, params, np.zeros((1, 8), np.int32), [8], cache, press=press.KnormPress(0.5))
