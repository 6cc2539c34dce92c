"""The cache changes the cost, never the answer.

Oracle: `kvjax.forward`, the full causal pass with no cache. Every cached path (prefill,
chunked prefill, decode_step, generate, multi-turn) must reproduce its logits/tokens.
Tolerance: float32 logits agree to atol=rtol=2e-4. The paths do the same math with a
different reduction order (a chunk of T queries vs one; keys padded to max_len and
masked), which moves float32 results by ~1e-6 relative; logits here are O(10), so 2e-4
leaves margin for accumulation over layers yet catches any masking or position error
(those move logits by O(1)).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvjax
from conftest import FAMILIES, model

TOL = dict(atol=2e-4, rtol=2e-4)
B, P, N = 3, 12, 6          # batch, padded prompt width, decode steps (fixed shapes: one compile)
MAX_LEN = P + N
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_prefill_then_decode_matches_forward(name, data):
    cfg, params = model(name)
    lens = np.array(data.draw(st.lists(st.integers(1, P), min_size=B, max_size=B)), np.int32)
    seed = data.draw(st.integers(0, 2**16))
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, P + N), dtype=np.int32)
    # Row b's sequence is toks[b, :lens[b] + N]; forward is causal, so its logits at t
    # depend only on toks[b, :t+1] and one full pass is the oracle for every row.
    full = np.asarray(kvjax.forward(cfg, params, toks))
    rows = np.arange(B)

    cache = kvjax.init_cache(cfg, B, MAX_LEN)
    logits, cache = kvjax.prefill(cfg, params, toks[:, :P], lens, cache)
    np.testing.assert_allclose(np.asarray(logits), full[rows, lens - 1], **TOL)
    for i in range(N):
        logits, cache = kvjax.decode_step(cfg, params, toks[rows, lens + i], cache)
        np.testing.assert_allclose(np.asarray(logits), full[rows, lens + i], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens + N)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-tiny"])
@SETTINGS
@given(data=st.data())
def test_chunked_prefill_equals_single_prefill(name, data):
    cfg, params = model(name)
    # Two cut points per row split each prompt into three non-empty chunks.
    lens = np.array(data.draw(st.lists(st.integers(3, P), min_size=B, max_size=B)), np.int32)
    cut1 = np.array([data.draw(st.integers(1, n - 2)) for n in lens], np.int32)
    cut2 = np.array([data.draw(st.integers(c + 1, n - 1)) for c, n in zip(cut1, lens)], np.int32)
    toks = np.random.default_rng(int(lens.sum())).integers(0, cfg.vocab_size, (B, P), dtype=np.int32)

    one, cache_one = kvjax.prefill(cfg, params, toks, lens, kvjax.init_cache(cfg, B, MAX_LEN))
    cache = kvjax.init_cache(cfg, B, MAX_LEN)
    for lo, hi in ((np.zeros_like(cut1), cut1), (cut1, cut2), (cut2, lens)):
        chunk = np.zeros((B, P), np.int32)  # fixed padded width: one compile for every chunk
        for b in range(B):
            chunk[b, : hi[b] - lo[b]] = toks[b, lo[b]:hi[b]]
        logits, cache = kvjax.prefill(cfg, params, chunk, hi - lo, cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(one), **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    for l in range(cfg.num_layers):
        for got, want in ((cache.keys[l], cache_one.keys[l]), (cache.values[l], cache_one.values[l])):
            for b in range(B):
                np.testing.assert_allclose(np.asarray(got)[b, :, : lens[b]],
                                           np.asarray(want)[b, :, : lens[b]], **TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_and_without_cache_agree(name, rng):
    cfg, params = model(name)
    prompts = rng.integers(0, cfg.vocab_size, (B, P), dtype=np.int32)
    lens = np.array([P, 2, 7], np.int32)
    out = kvjax.generate(cfg, params, prompts, prompt_lengths=lens, max_new_tokens=16)
    ref = kvjax.generate(cfg, params, prompts, prompt_lengths=lens, max_new_tokens=16, use_cache=False)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), [16] * B)
    # The returned cache holds the prompt and every generated token.
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), lens + 16)
    # Generated tokens are not degenerate (a model stuck on one token would hide bugs).
    assert len(np.unique(np.asarray(out.tokens))) > 8


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny"])
def test_ragged_batch_equals_each_row_alone(name, rng):
    cfg, params = model(name)
    prompts = rng.integers(0, cfg.vocab_size, (B, P), dtype=np.int32)
    lens = np.array([5, P, 1], np.int32)
    batch = np.asarray(kvjax.generate(cfg, params, prompts, prompt_lengths=lens, max_new_tokens=10).tokens)
    for b in range(B):
        alone = kvjax.generate(cfg, params, prompts[b:b + 1, : lens[b]], max_new_tokens=10)
        np.testing.assert_array_equal(batch[b], np.asarray(alone.tokens)[0])


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_second_turn_continues_the_conversation(name, rng):
    """generate turn 1, prefill turn 2 onto the returned cache == one pass over everything."""
    cfg, params = model(name)
    turn1 = rng.integers(0, cfg.vocab_size, (2, 6), dtype=np.int32)
    lens1 = np.array([6, 3], np.int32)
    out = kvjax.generate(cfg, params, turn1, prompt_lengths=lens1, max_new_tokens=5, max_len=40)
    turn2 = rng.integers(0, cfg.vocab_size, (2, 7), dtype=np.int32)
    lens2 = np.array([4, 7], np.int32)
    logits, cache = kvjax.prefill(cfg, params, turn2, lens2, out.cache)

    gen = np.asarray(out.tokens)
    history = [np.concatenate([turn1[b, : lens1[b]], gen[b], turn2[b, : lens2[b]]]) for b in range(2)]
    width = max(len(h) for h in history)
    whole = np.zeros((2, width), np.int32)
    for b, h in enumerate(history):
        whole[b, : len(h)] = h
    total = np.array([len(h) for h in history], np.int32)
    full = np.asarray(kvjax.forward(cfg, params, whole, total))
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(2), total - 1], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), total)

    # A third turn through generate(cache=...) equals generate over the whole history.
    more = kvjax.generate(cfg, params, turn2[:, :1], max_new_tokens=4, cache=cache)
    hist3 = np.concatenate([whole, np.zeros((2, 1), np.int32)], 1)
    hist3[np.arange(2), total] = turn2[:, 0]
    ref = kvjax.generate(cfg, params, hist3, prompt_lengths=total + 1, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(more.tokens), np.asarray(ref.tokens))


def test_sliding_window_limits_what_a_query_sees(rng):
    """mistral-tiny (window 8): tokens older than the window cannot change the logits."""
    cfg, params = model("mistral-tiny")
    assert cfg.sliding_window == 8
    a = rng.integers(0, cfg.vocab_size, (1, 20), dtype=np.int32)
    b = a.copy()
    b[0, :2] = (a[0, :2] + 1) % cfg.vocab_size   # change only the two oldest tokens
    # With 2 layers the receptive field is 2 * (window - 1) = 14 positions back, so
    # position 19 sees back to 5: it must not change; position 10 must.
    la = np.asarray(kvjax.forward(cfg, params, a))
    lb = np.asarray(kvjax.forward(cfg, params, b))
    np.testing.assert_allclose(la[0, 19], lb[0, 19], **TOL)
    assert np.abs(la[0, 10] - lb[0, 10]).max() > 1e-2
