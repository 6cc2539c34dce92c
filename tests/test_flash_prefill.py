"""Flash-style chunked prefill: a chunk of several tokens on a full dense/int8 layer reads the
cache in key blocks up to its rows' ends, in a loop with a traced trip count and an online
softmax (kvjax/cache/dense.attend_flash, attention_math.softmax_loop).

Oracle: the materialised path (one prefill call, prefill_chunk=None; and the chunked path with
flash turned off). Key blocks here are 16 slots (plans.FLASH_BLOCK patched for the module)
on caches of 100 slots, so chunks visit several blocks and the last block is clamped
(100 = 6 * 16 + 4). Row lengths are drawn at random inside fixed padded shapes, so every
draw reuses the compiled programs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention_math import (fold_scale, group_mask, group_queries, grouped_scores, scores, softmax_blocks,
                                  softmax_loop, ungroup)
from kvjax.decode import plans
from kvjax.decode.programs import prefill_program

from conftest import INIT_STD

ATOL = 1e-5   # and, against one call, RTOL: logits of magnitude ~5 after float32 sums in
RTOL = 1e-5   # another order (today's materialised chunks differ from one call by 1.05e-5 too)
B, T, S, CHUNK = 3, 45, 100, 8

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: COMPILES.append(event) if event.endswith("backend_compile_duration") else None)


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans, "FLASH_BLOCK", 16)
        yield


def _model(name, seed, **overrides):
    cfg = kvjax.ModelConfig.preset(name, **overrides)
    return cfg, kvjax.init_params(cfg, jax.random.key(seed), std=INIT_STD)


@pytest.fixture(scope="module")
def llama():      # GQA: 4 query heads over 2 kv heads
    return _model("llama-tiny", 11)


@pytest.fixture(scope="module")
def gemma2():     # soft-capped scores, query_pre_attn_scalar, sliding layers of window 8
    return _model("gemma2-tiny", 12, num_layers=2, layer_types=("sliding", "full"))


def _draw(seed):
    """Prompts [B, T] and ragged lengths in [1, T] (one row always full, one short)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T + 1, B).astype(np.int32)
    lens[0], lens[1] = T, rng.integers(1, CHUNK + 1)
    return rng.integers(0, 320, (B, T), dtype=np.int32), lens


def _valid(cache):
    """Every row's written contents: dense slots below its length, rings whole, positions."""
    lens = np.asarray(cache.lengths)
    out = [lens]
    for arrays in (cache.keys, cache.values, cache.key_scales or (), cache.value_scales or ()):
        for a in arrays:
            a = np.asarray(a, np.float32)
            out += [a[b, :, :lens[b]] for b in range(B)] if a.shape[2] == cache.max_len else [a]
    if cache.slot_pos is not None:
        out.append(np.asarray(cache.slot_pos))
    return out


def _close_caches(a, b, atol=ATOL):
    for x, y in zip(_valid(a), _valid(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def _prefill(model, tok, lens, chunk, **cache_kw):
    cfg, params = model
    return kvjax.prefill(cfg, params, tok, lens, kvjax.init_cache(cfg, B, S, **cache_kw), prefill_chunk=chunk)


CASES = [("llama", dict(kind="dense")), ("llama", dict(kind="int8")),
         ("gemma2", dict(hybrid=True)), ("gemma2", dict(hybrid=False))]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", range(len(CASES)), ids=["llama-dense", "llama-int8", "gemma2-hybrid",
                                                          "gemma2-dense"])
def test_chunked_flash_equals_one_call(request, case, seed):
    name, kw = CASES[case]
    model = request.getfixturevalue(name)
    tok, lens = _draw(seed)
    l1, c1 = _prefill(model, tok, lens, None, **kw)
    l2, c2 = _prefill(model, tok, lens, CHUNK, **kw)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=ATOL, rtol=RTOL)
    if kw.get("kind") == "int8":   # codes may round the other way at a boundary: compare values
        np.testing.assert_array_equal(np.asarray(c2.lengths), np.asarray(c1.lengths))
        for x, y in zip(c1.keys + c1.values, c2.keys + c2.values):
            assert np.mean(np.asarray(x) == np.asarray(y)) > 0.999
    else:
        _close_caches(c1, c2)


def test_flash_equals_the_materialised_chunked_path(llama, monkeypatch):
    from kvjax.decode import api
    tok, lens = _draw(7)
    flash = _prefill(llama, tok, lens, CHUNK)
    monkeypatch.setattr(api, "flash_block", lambda cache, mesh=None: None)
    plain = _prefill(llama, tok, lens, CHUNK)
    np.testing.assert_allclose(np.asarray(flash[0]), np.asarray(plain[0]), atol=ATOL)
    _close_caches(flash[1], plain[1])


def test_one_compile_serves_every_chunk_of_a_width(llama):
    """300 tokens in chunks of 64 on 512 slots: the static live prefixes would be 128, 128, 256,
    256, 512 (three programs); the flash loop needs one, and none for other lengths."""
    cfg, params = llama
    rng = np.random.default_rng(3)
    tok = rng.integers(0, 320, (B, 300), dtype=np.int32)
    # jit's private _cache_size counts this program's compilations where the running JAX has
    # it (0.10 does); JAX's public compile events count every program's, and must stay at 0
    programs = getattr(prefill_program, "_cache_size", lambda: 0)
    runs = []
    for lens in ([300, 70, 200], [300, 300, 1], [129, 260, 64]):
        before = len(COMPILES), programs()
        cache = kvjax.init_cache(cfg, B, 512)
        kvjax.prefill(cfg, params, tok, np.array(lens, np.int32), cache, prefill_chunk=64)
        runs.append((programs() - before[1], len(COMPILES) - before[0]))
    assert runs[0][0] == (1 if hasattr(prefill_program, "_cache_size") else 0) and runs[0][1] >= 1
    assert runs[1:] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("name,kw", [("llama", dict(cache_kind="dense")), ("gemma2", {})])
def test_generate_tokens_identical(request, name, kw):
    cfg, params = request.getfixturevalue(name)
    tok, lens = _draw(5)
    outs = [kvjax.generate(cfg, params, tok, lens, max_new_tokens=6, prefill_chunk=c, max_len=S, **kw)
            for c in (None, CHUNK)]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_array_equal(np.asarray(outs[1].lengths), np.asarray(outs[0].lengths))
    _close_caches(outs[0].cache, outs[1].cache)


def test_rows_without_tokens_write_nothing_and_stay_finite(llama):
    cfg, params = llama
    tok, _ = _draw(9)
    _, cache = _prefill(llama, tok[:, :6], np.array([6, 2, 4], np.int32), None)
    before = _valid(cache)
    zero = jnp.asarray(np.array([0, 3, 0], np.int32))
    logits, after = prefill_program(cfg, params, jnp.asarray(tok[:, :8]), zero, cache, None, None, None, 16)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(np.asarray(after.lengths), [6, 5, 4])
    got = _valid(after)
    for i in range(1, len(got)):
        if (i - 1) % B != 1:   # rows 0 and 2 of every buffer
            np.testing.assert_array_equal(got[i], before[i])


@pytest.mark.parametrize("softcap,whole", [(None, 0), (5.0, 0), (None, 2)])
def test_softmax_loop_equals_one_softmax(softcap, whole):
    """Random scores, masks with fully masked queries, blocks of 8: the loop over all blocks
    equals softmax_blocks over the concatenated keys (fully masked rows included); with
    `whole` leading blocks visible to every query, an unmasked segment over them then a
    masked one gives the same softmax."""
    rng = np.random.default_rng(0)
    b, k, g, t, h, n, w = 2, 2, 3, 5, 4, 4, 8
    s = jnp.asarray(rng.normal(size=(b, k, g, t, n * w)) * 3, jnp.float32)
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    mask = rng.random((b, 1, t, n * w)) < 0.5
    mask[0, 0, 1, whole * w:] = False         # a query that sees nothing (past the whole blocks)
    mask[1, 0, :, whole * w: (whole + 1) * w] = False   # a whole block masked for every query
    mask[..., : whole * w] = True
    mask = jnp.asarray(mask)
    v = jnp.asarray(rng.normal(size=(b, k, n * w, h)), jnp.float32)
    sm, mm = s.reshape(b, k, g * t, n * w), group_mask(mask, g)

    def block(j, masked):
        cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, j * w, w, axis)  # noqa: E731
        return cut(sm, 3), (cut(mm, 3) if masked else None), cut(v, 2)

    loop = jax.jit(lambda lo, mid, hi: ungroup(softmax_loop(block, [(lo, mid, False), (mid, hi, True)],
                                                            (b, k, g * t, h)), t, jnp.float32))
    got = loop(0, whole, n)
    want = softmax_blocks([(s, mask, v)], jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_grouped_scores_equal_scores():
    """The grouped layout holds the same scores as `scores` (scale and soft-cap included)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(2, 3, 7, 4)), jnp.float32)
    want = scores(q, keys, 0.3, 2.0)                       # [B, K, G, T, S]
    got = grouped_scores(group_queries(q, 3), keys, 0.3, 2.0)
    # float32: the two layouts reduce in another order; scores are O(1), so 1e-6 absolute
    # (4e-8 differences near zero failed rtol alone on an AMD EPYC VM, session 11)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want).reshape(2, 3, 10, 7), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ungroup(group_queries(q, 3), 5, q.dtype)), np.asarray(q))
    folded, rest = fold_scale(group_queries(q, 3), 0.3)       # float32: the scale moves into q
    assert rest == 1.0
    np.testing.assert_allclose(np.asarray(grouped_scores(folded, keys, rest, 2.0)), np.asarray(got), rtol=1e-5,
                               atol=1e-6)
    half = group_queries(q, 3).astype(jnp.bfloat16)
    assert fold_scale(half, 0.3)[1] == 0.3                   # bfloat16: only a power of two moves
    folded, rest = fold_scale(half, None)                    # 1/sqrt(4) = 0.5: exact
    assert rest == 1.0 and np.array_equal(np.asarray(folded, np.float32), np.asarray(half, np.float32) * 0.5)
