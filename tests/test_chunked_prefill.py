"""Chunked prefill (`prefill_chunk`): a prompt wider than the chunk width is appended in
chunks of that width, in bounded memory.

Oracle: the same call with prefill_chunk=None (the whole prompt in one program, the path
every other test checks against transformers and the no-cache forward). Logits of each
row's last real token agree within float32 rounding (atol 2e-5: the chunked softmax sums
run over other widths and key blocks, so the float32 additions happen in another order);
greedy tokens and the caches' valid contents (every slot below each row's length; the ring
slots and their positions) are equal.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.decode.programs import prefill_program

from conftest import INIT_STD

ATOL = 2e-5
B, T = 3, 37
LENS = np.array([37, 5, 20], np.int32)   # ragged: row 1 ends in chunk 0 of width 8


@pytest.fixture(scope="module")
def llama():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    return cfg, kvjax.init_params(cfg, jax.random.key(1), std=INIT_STD)


@pytest.fixture(scope="module")
def gemma2():
    cfg = kvjax.ModelConfig.preset("gemma2-tiny")
    return cfg, kvjax.init_params(cfg, jax.random.key(2), std=INIT_STD)


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, 320, (B, T), dtype=np.int32)


def _valid(cache):
    """Each row's valid slots of every layer (dense: [0, length); rings: the whole ring and
    its positions) as host arrays."""
    lens = np.asarray(cache.lengths)
    out = [lens]
    for arrays in (cache.keys, cache.values, cache.key_scales or (), cache.value_scales or ()):
        for a in arrays:
            a = np.asarray(a)
            if cache.slot_pos is None and a.shape[2] == cache.max_len:
                a = [a[b, :, :lens[b]] for b in range(a.shape[0])]
            out.append(a)
    if cache.slot_pos is not None:
        out.append(np.asarray(cache.slot_pos))
    return out


def _assert_same_cache(a, b):
    for x, y in zip(_valid(a), _valid(b), strict=True):
        for xr, yr in zip(x, y, strict=True):
            np.testing.assert_allclose(np.asarray(xr, np.float32), np.asarray(yr, np.float32), atol=ATOL)


def _both(model, prompts, lens, chunk, history=None, **cache_kw):
    """(one-call logits, cache), (chunked logits, cache) on fresh caches (after `history`)."""
    cfg, params = model
    out = []
    for c in (None, chunk):
        cache = kvjax.init_cache(cfg, B, 96, **cache_kw)
        if history is not None:
            _, cache = kvjax.prefill(cfg, params, history[0], history[1], cache, prefill_chunk=None)
        out.append(kvjax.prefill(cfg, params, prompts, lens, cache, prefill_chunk=c))
    return out


@pytest.mark.parametrize("kind", ["dense", "int8", "window", "sinks"])
@pytest.mark.parametrize("chunk", [8, 13])
def test_chunked_prefill_equals_one_call(llama, prompts, kind, chunk):
    kw = dict(kind=kind)
    cfg, params = llama
    ring = kind in ("window", "sinks")
    one, many = [], []
    for c, out in ((None, one), (chunk, many)):
        cache = kvjax.init_cache(cfg, B, 16 if ring else 96, **kw)
        out.extend(kvjax.prefill(cfg, params, prompts, LENS, cache, prefill_chunk=c))
    np.testing.assert_allclose(np.asarray(many[0]), np.asarray(one[0]), atol=ATOL)
    _assert_same_cache(one[1], many[1])


@pytest.mark.parametrize("chunk", [5, 8, 16])
@pytest.mark.parametrize("hybrid", [True, False])
def test_layer_windows_of_a_gemma2_model(gemma2, prompts, chunk, hybrid):
    (l1, c1), (l2, c2) = _both(gemma2, prompts, LENS, chunk, hybrid=hybrid)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=ATOL)
    _assert_same_cache(c1, c2)


def test_continuing_a_conversation(llama, prompts):
    history = (prompts[:, :11] % 7, np.array([11, 3, 6], np.int32))
    (l1, c1), (l2, c2) = _both(llama, prompts, LENS, 8, history=history)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=ATOL)
    _assert_same_cache(c1, c2)


def test_one_program_runs_per_chunk(llama, prompts, monkeypatch):
    from kvjax.decode import api
    widths = []
    real = api.programs.prefill_program

    def spy(cfg, params, tokens, *rest):
        widths.append(tokens.shape[1])
        return real(cfg, params, tokens, *rest)

    monkeypatch.setattr(api.programs, "prefill_program", spy)
    cfg, params = llama
    kvjax.prefill(cfg, params, prompts, LENS, kvjax.init_cache(cfg, B, 96), prefill_chunk=8)
    assert widths == [8] * 5                      # 37 tokens: chunks 0..4, each padded to 8
    widths.clear()
    kvjax.prefill(cfg, params, prompts, LENS, kvjax.init_cache(cfg, B, 96), prefill_chunk=0)
    assert widths == [T]


def test_a_row_of_zero_tokens_writes_nothing(llama, prompts):
    cfg, params = llama
    cache = kvjax.init_cache(cfg, B, 96)
    _, cache = kvjax.prefill(cfg, params, prompts[:, :6], np.array([6, 2, 4], np.int32), cache)
    before = _valid(cache)
    zero = jnp.asarray(np.array([0, 3, 0], np.int32))
    _, after = prefill_program(cfg, params, jnp.asarray(prompts[:, :8]), zero, cache, None, None, None)
    np.testing.assert_array_equal(np.asarray(after.lengths), [6, 5, 4])
    got = _valid(after)
    for layer in range(1, len(got)):
        for b in (0, 2):
            np.testing.assert_array_equal(got[layer][b], before[layer][b])


def test_kivi_keeps_one_call(llama, prompts):
    """KIVI's one call attends over the whole prompt unquantised; chunks would see earlier
    chunks quantised, so a kivi cache takes one call whatever prefill_chunk says."""
    (l1, c1), (l2, c2) = _both(llama, prompts, LENS, 8, kind="kivi", residual_length=16, group_size=16)
    np.testing.assert_array_equal(np.asarray(l2), np.asarray(l1))


@pytest.mark.parametrize("kind", ["dense", "window"])
def test_generate_with_a_long_prompt(llama, prompts, kind):
    cfg, params = llama
    outs = [kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=6, prefill_chunk=c, cache_kind=kind,
                           max_len=64 if kind == "dense" else 16) for c in (None, 8)]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_array_equal(np.asarray(outs[1].lengths), np.asarray(outs[0].lengths))
    _assert_same_cache(outs[0].cache, outs[1].cache)


def test_generate_hybrid_gemma2(gemma2, prompts):
    cfg, params = gemma2
    outs = [kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=5, prefill_chunk=c) for c in (None, 5)]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    _assert_same_cache(outs[0].cache, outs[1].cache)


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True])
def test_bad_prefill_chunk(llama, prompts, bad):
    cfg, params = llama
    with pytest.raises(ValueError, match=f"prefill_chunk must be .* got {bad!r}"):
        kvjax.prefill(cfg, params, prompts, LENS, kvjax.init_cache(cfg, B, 96), prefill_chunk=bad)
    with pytest.raises(ValueError, match="prefill_chunk"):
        kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=2, prefill_chunk=bad)


def test_generate_continuing_a_conversation(llama, prompts):
    cfg, params = llama
    outs = []
    for c in (None, 8):
        cache = kvjax.init_cache(cfg, B, 64)
        _, cache = kvjax.prefill(cfg, params, prompts[:, :9], np.array([9, 2, 5], np.int32), cache)
        outs.append(kvjax.generate(cfg, params, prompts, LENS, max_new_tokens=4, cache=cache, prefill_chunk=c))
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    _assert_same_cache(outs[0].cache, outs[1].cache)
