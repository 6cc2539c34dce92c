"""Cache kinds against their oracles.

window and sinks are exact: each equals `kvjax.forward` (no cache) on a config with the
same attention pattern (sliding window; window + attention sinks with StreamingLLM cache
positions), to float32 reordering noise (TOL as in test_decode_equivalence.py). int8 is
lossy by design and is held to a bound derived from its quantisation step (see below).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import FAMILIES, model

TOL = dict(atol=2e-4, rtol=2e-4)
B, T, P = 2, 36, 5          # batch, stream length, prompt part (the rest is decoded)


def _stream_logits(cfg, params, toks, cache, first_chunk):
    """Prefill toks[:, :first_chunk], then decode the rest one token at a time."""
    logits, cache = kvjax.prefill(cfg, params, toks[:, :first_chunk], None, cache)
    out = [np.asarray(logits)]
    for i in range(first_chunk, toks.shape[1]):
        logits, cache = kvjax.decode_step(cfg, params, toks[:, i], cache)
        out.append(np.asarray(logits))
    return np.stack(out, 1), cache          # [B, T - first_chunk + 1, V]


# (family, kind, slots, sinks, oracle config overrides)
EXACT = [
    ("mistral-tiny", "window", 8, None, {}),                                  # ring == model window
    ("llama-tiny", "window", 8, None, {"sliding_window": 8}),                 # ring imposes a window
    ("llama-tiny", "sinks", 10, 2, {"sliding_window": 8, "attention_sinks": 2}),
    ("qwen2-tiny", "sinks", 12, 4, {"sliding_window": 8, "attention_sinks": 4}),
    ("gpt2-tiny", "sinks", 10, 2, {"sliding_window": 8, "attention_sinks": 2}),  # learned positions
]


@pytest.mark.parametrize("name, kind, slots, sinks, oracle", EXACT)
@pytest.mark.parametrize("first_chunk", [P, 20])      # 20 > ring: a chunk longer than the ring
def test_ring_kinds_equal_their_pattern_oracle(name, kind, slots, sinks, oracle, first_chunk, rng):
    cfg, params = model(name)
    toks = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    full = np.asarray(kvjax.forward(cfg.replace(**oracle), params, toks))
    cache = kvjax.init_cache(cfg, B, slots, kind=kind, num_sinks=sinks)
    got, cache = _stream_logits(cfg, params, toks, cache, first_chunk)
    np.testing.assert_allclose(got, full[:, first_chunk - 1:], **TOL)
    assert int(cache.lengths[0]) == T >= 3 * slots      # ran far past its slots (wrapped)
    assert cache.nbytes == kvjax.cache_bytes(cfg, B, slots, kind=kind, num_sinks=sinks)


def test_window_kind_generates_the_dense_tokens_on_a_sliding_window_model(rng):
    """mistral-tiny has window 8: an 8-slot ring loses nothing against a full dense cache
    (hybrid=False: max_len slots on every layer; the default dense cache of a model windowed
    on every layer is itself a ring, see tests/test_hybrid_cache.py)."""
    cfg, params = model("mistral-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (3, 12), dtype=np.int32)
    lens = np.array([12, 3, 7], np.int32)
    dense = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=30, hybrid=False)
    ring = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=30, max_len=8, cache_kind="window")
    np.testing.assert_array_equal(np.asarray(ring.tokens), np.asarray(dense.tokens))
    assert ring.cache.nbytes < dense.cache.nbytes / 4


def test_sinks_and_window_differ_once_the_window_slides(rng):
    """Keeping the first tokens changes what later queries see: the kinds are not the same."""
    cfg, params = model("llama-tiny")
    toks = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    win, _ = _stream_logits(cfg, params, toks, kvjax.init_cache(cfg, B, 8, kind="window"), P)
    snk, _ = _stream_logits(cfg, params, toks, kvjax.init_cache(cfg, B, 10, kind="sinks", num_sinks=2), P)
    assert np.abs(win[:, -1] - snk[:, -1]).max() > 1e-2


@pytest.mark.parametrize("kind", ["window", "sinks"])
def test_unbounded_kinds_stream_past_max_len_dense_raises(kind, rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (2, 6), dtype=np.int32)
    out = kvjax.generate(cfg, params, prompts, max_new_tokens=48, max_len=12, cache_kind=kind)
    assert out.tokens.shape == (2, 48) and int(out.cache.lengths[0]) == 54
    assert len(np.unique(np.asarray(out.tokens))) > 8
    with pytest.raises(ValueError, match=r"needs 54 cache slots .* max_len is 12"):
        kvjax.generate(cfg, params, prompts, max_new_tokens=48, max_len=12, cache_kind="dense")
    with pytest.raises(ValueError, match=r"needs 54 cache slots .* max_len is 12"):
        kvjax.generate(cfg, params, prompts, max_new_tokens=48, max_len=12, cache_kind="int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_logits_close_to_dense(name, rng):
    """Absmax int8 rounds each stored K/V element by at most scale/2 = max|x|/254 (0.4% of
    the row's largest entry). On these random std-0.2 models that moves logits by a mean of
    0.8-1.4% of their standard deviation and at most 5-14% at the worst position (measured
    on every family, 2026-11-28); the bounds below are about twice that, tight enough that
    a wrong scale axis or a missing dequantisation (errors of order 100%) fails. Greedy
    choices must agree on at least 90% of positions (measured 97-98%). Quality on a
    trained model is measured by experiments/compression_quality.yaml."""
    cfg, params = model(name)
    toks = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    dense, _ = _stream_logits(cfg, params, toks, kvjax.init_cache(cfg, B, T), P)
    q8, cache = _stream_logits(cfg, params, toks, kvjax.init_cache(cfg, B, T, kind="int8"), P)
    assert cache.keys[0].dtype == jnp.int8
    err = np.abs(q8 - dense)
    assert 0 < err.mean() <= 0.025 * dense.std(), (err.mean(), dense.std())
    assert err.max() <= 0.25 * dense.std(), (err.max(), dense.std())
    assert (q8.argmax(-1) == dense.argmax(-1)).mean() >= 0.9


def test_int8_cache_is_a_quarter_of_float32_plus_scales():
    cfg = kvjax.ModelConfig.preset("llama-7b")
    f32 = kvjax.cache_bytes(cfg, 1, 1024, "float32") - 4
    bf16 = kvjax.cache_bytes(cfg, 1, 1024, "bfloat16") - 4
    q8 = kvjax.cache_bytes(cfg, 1, 1024, kind="int8") - 4
    scales = 2 * 32 * 32 * 1024 * 4          # K and V, layers, kv heads, tokens, float32
    assert q8 == f32 // 4 + scales == bf16 // 2 + scales


@pytest.mark.parametrize("kind, sinks", [("int8", None), ("window", None), ("sinks", 2)])
def test_every_kind_handles_ragged_batches(kind, sinks, rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (3, 10), dtype=np.int32)
    lens = np.array([10, 2, 6], np.int32)
    kw = dict(max_new_tokens=20, max_len=10 if kind != "int8" else 30, cache_kind=kind, num_sinks=sinks)
    batch = np.asarray(kvjax.generate(cfg, params, prompts, lens, **kw).tokens)
    for b in range(3):
        alone = kvjax.generate(cfg, params, prompts[b:b + 1, : lens[b]], **kw)
        np.testing.assert_array_equal(batch[b], np.asarray(alone.tokens)[0])


@pytest.mark.parametrize("kind", ["int8", "window", "sinks"])
def test_decode_step_updates_every_kind_in_place(kind):
    import re

    from kvjax.decode import decode_program

    cfg, params = model("llama-tiny")
    cache = kvjax.init_cache(cfg, 2, 24, kind=kind)
    hlo = decode_program.lower(cfg, params, jnp.zeros((2,), jnp.int32), cache).compile().as_text()
    K, H = cfg.num_kv_heads, cfg.head_dim
    stored = "|".join(re.escape(s) for s in (f"[2,{K},24,{H}]", f"[2,{K},24]", "[2,24]"))
    copies = [l for l in hlo.splitlines() if re.search(r"= \w+(" + stored + r")\S* copy\(", l)]
    assert copies == []                # buffers, int8 scales and slot positions: no copies


def test_bad_kind_arguments():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    with pytest.raises(ValueError, match=r"unknown cache kind 'paged'; kinds are \['dense', 'int8', 'window', 'sinks', 'kivi'\]"):
        kvjax.init_cache(cfg, 1, 8, kind="paged")
    with pytest.raises(ValueError, match=r"num_sinks=8, max_len=8"):
        kvjax.init_cache(cfg, 1, 8, kind="sinks", num_sinks=8)


@pytest.mark.parametrize("kind, slots, oracle", [("dense", T, {}), ("sinks", 10, {"sliding_window": 6, "attention_sinks": 4})])
def test_stream_logits_reads_a_stream_through_the_cache(kind, slots, oracle, rng):
    from kvjax.evaluate import stream_logits, token_nll

    cfg, params = model("llama-tiny")
    toks = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    logits, cache = stream_logits(cfg, params, toks, kvjax.init_cache(cfg, B, slots, kind=kind))
    full = np.asarray(kvjax.forward(cfg.replace(**oracle), params, toks))
    np.testing.assert_allclose(np.asarray(logits), full, **TOL)
    assert int(cache.lengths[0]) == T
    nll = token_nll(logits, toks)
    ref = -np.take_along_axis(jax.nn.log_softmax(full[:, :-1]), toks[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(nll, ref, **TOL)
