"""Sampling: pure functions of (logits, key, per-row parameters), checked against NumPy oracles."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kvjax
from conftest import model

V = 50


def _params(B, temperature=1.0, top_k=0, top_p=1.0):
    return (jnp.full((B,), temperature, jnp.float32), jnp.full((B,), top_k, jnp.int32),
            jnp.full((B,), top_p, jnp.float32))


def test_temperature_zero_is_greedy(rng):
    logits = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    t, k, p = _params(4, temperature=0.0)
    for seed in range(3):
        got = kvjax.sample(logits, jax.random.key(seed), t, k, p)
        np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def test_per_row_temperature_mixes_greedy_and_sampled_rows(rng):
    logits = jnp.asarray(rng.normal(size=(2, V)), jnp.float32)
    t = jnp.array([0.0, 5.0], jnp.float32)
    _, k, p = _params(2)
    draws = np.stack([np.asarray(kvjax.sample(logits, jax.random.key(s), t, k, p)) for s in range(40)])
    assert (draws[:, 0] == np.argmax(np.asarray(logits)[0])).all()
    assert len(np.unique(draws[:, 1])) > 5       # the hot row really samples


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, V), seed=st.integers(0, 1000))
def test_top_k_never_samples_outside_the_k_best(k, seed):
    logits = np.random.default_rng(seed).normal(size=(8, V)).astype(np.float32)
    t, kk, p = _params(8, temperature=3.0, top_k=k)
    got = np.asarray(kvjax.sample(jnp.asarray(logits), jax.random.key(seed), t, kk, p))
    kth_best = np.sort(logits, -1)[:, ::-1][:, k - 1]
    assert (logits[np.arange(8), got] >= kth_best).all()


# Float32 noise in the code's cumulative mass (a float32 cumsum of V <= 1 probabilities, and
# the softmax before it) is below ~3e-6; a row whose mass before some token lies within
# this of top_p could go either way, so it is not a test of the rule (~0.3% of examples).
BOUNDARY_TOL = 1e-5


@settings(max_examples=30, deadline=None)
@given(p=st.floats(0.05, 0.99), seed=st.integers(0, 1000))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p, seed):
    """The code's rule: in descending order, token i is kept while the mass before it is < p
    (so the top token always is): the smallest prefix whose mass reaches p. Expected sets
    come from float64 probabilities and the float32 p the code compares against."""
    logits = np.random.default_rng(seed).normal(size=(4, V)).astype(np.float32) * 2
    t, k, pp = _params(4, top_p=p)
    p = float(pp[0])                                   # the float32 value the code sees
    kept = np.isfinite(np.asarray(kvjax.filter_logits(jnp.asarray(logits), k, pp)))
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, -1)
    before = np.cumsum(np.take_along_axis(probs, order, -1), -1)[:, :-1]   # mass before order[:, 1:]
    assume(not (np.abs(before - p) <= BOUNDARY_TOL).any())
    for b in range(4):
        n = 1 + int((before[b] < p).sum())
        assert set(np.flatnonzero(kept[b])) == set(order[b, :n]), (b, n)
        assert probs[b][kept[b]].sum() >= p


def test_top_k_and_top_p_compose(rng):
    logits = jnp.asarray(rng.normal(size=(3, V)), jnp.float32)
    t, k, p = _params(3, top_k=5, top_p=0.999)
    kept = np.isfinite(np.asarray(kvjax.filter_logits(logits, k, p)))
    assert (kept.sum(-1) == 5).all()        # top-p over the 5 survivors keeps all of them


def test_same_key_same_tokens_different_key_different_tokens(rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (2, 6), dtype=np.int32)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    a = kvjax.generate(cfg, params, prompts, key=jax.random.key(1), **kw)
    b = kvjax.generate(cfg, params, prompts, key=jax.random.key(1), **kw)
    c = kvjax.generate(cfg, params, prompts, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # The no-cache baseline draws with the same keys, so it samples the same tokens too.
    d = kvjax.generate(cfg, params, prompts, key=jax.random.key(1), use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(d.tokens))


def test_changing_sampling_parameters_does_not_recompile(rng):
    from kvjax.decode import generate_program

    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (2, 6), dtype=np.int32)
    kvjax.generate(cfg, params, prompts, max_new_tokens=5)
    before = generate_program._cache_size()
    for temp, k, p, eos in ((0.7, 0, 1.0, None), (1.3, 20, 0.9, 5), ([0.0, 2.0], [0, 3], [1.0, 0.5], 7)):
        kvjax.generate(cfg, params, prompts, max_new_tokens=5, temperature=temp, top_k=k, top_p=p,
                       eos_token_id=eos, key=jax.random.key(3))
    assert generate_program._cache_size() == before


def test_eos_stops_rows_independently(rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (3, 6), dtype=np.int32)
    free = np.asarray(kvjax.generate(cfg, params, prompts, max_new_tokens=12).tokens)
    eos = int(free[0, 4])            # row 0 emits this at step 4 (or earlier)
    pad = 1
    out = kvjax.generate(cfg, params, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        n = int(hits[0]) + 1 if len(hits) else 12
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :n], free[b, :n])
        assert (np.asarray(out.tokens)[b, n:] == pad).all()
        # The cache holds exactly the prompt and the tokens up to and including EOS.
        assert int(out.cache.lengths[b]) == 6 + n
    assert int(out.lengths[0]) <= 5
    assert int(out.lengths.max()) > int(out.lengths[0])   # another row went on after row 0 stopped
