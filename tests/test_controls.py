"""Logit controls (kvjax/controls.py): penalties, logit bias, min_p, min_tokens, ignore_eos.

Oracles: a NumPy version of each rule (the order and formulas of the module docstring),
and, for the decode loops, a greedy host loop over full forward passes with those rules
applied to every step's logits. `generate` and the Engine must equal it token for token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import model
from kvjax.controls import apply_controls, make_controls
from kvjax.sampling import filter_logits

N = 10          # tokens generated per row
S = 6           # prompt width


def np_controls(logits, prompt, generated, presence=0.0, frequency=0.0, repetition=1.0, logit_bias=None,
                min_tokens=0, stops=()):
    """The four rules on one row, in float64, written from their definitions."""
    x = np.asarray(logits, np.float64).copy()
    for tok, b in (logit_bias or {}).items():
        x[tok] += b
    if len(generated) < min_tokens:
        x[list(stops)] = -np.inf
    for tok in set(prompt) | set(generated):
        x[tok] = x[tok] / repetition if x[tok] > 0 else x[tok] * repetition
    counts = np.bincount(np.asarray(generated, np.int64), minlength=len(x))
    return x - frequency * counts - presence * (counts > 0)


# Per-row settings of the decode tests: each row exercises other rules.
ROWS = [dict(repetition_penalty=0.3, presence_penalty=1.5),
        dict(frequency_penalty=0.8, presence_penalty=-2.0, logit_bias={3: 2.5, 11: -100.0}),
        dict(min_tokens=6, frequency_penalty=-2.0, repetition_penalty=1.5)]


def per_row(name):
    default = {"logit_bias": None, "min_tokens": 0, "repetition_penalty": 1.0}.get(name, 0.0)
    return [r.get(name, default) for r in ROWS]


SETTINGS = {name: per_row(name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                             "logit_bias", "min_tokens")}


def test_apply_controls_follows_the_numpy_rules(rng):
    B, V = 4, 40
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    prompts = [rng.integers(0, V, 5) for _ in range(B)]
    generated = [rng.integers(0, V, n) for n in (0, 3, 7, 12)]
    settings = dict(presence_penalty=[0.5, -1.0, 2.0, 0.0], frequency_penalty=[0.0, 0.7, -0.3, 1.9],
                    repetition_penalty=[1.3, 0.7, 1.0, 2.5], logit_bias=[{1: 5.0}, None, {2: -100.0, 3: 0.5}, {}],
                    min_tokens=[1, 5, 7, 0])
    stops = np.array([[4, 9, -1], [4, -1, -1], [0, 39, -1], [4, 9, 1]], np.int32)
    ctl = make_controls(V, B, prompts, **settings)
    counts = np.stack([np.bincount(g, minlength=V) for g in generated]).astype(np.int32)
    index = np.array([len(g) for g in generated], np.int32)
    got = np.asarray(apply_controls(jnp.asarray(logits), ctl, jnp.asarray(counts), jnp.asarray(index),
                                    jnp.asarray(stops)))
    for b in range(B):
        row = {k: v[b] for k, v in settings.items()}
        want = np_controls(logits[b], prompts[b].tolist(), generated[b].tolist(),
                           row["presence_penalty"], row["frequency_penalty"], row["repetition_penalty"],
                           row["logit_bias"], row["min_tokens"], [s for s in stops[b] if s >= 0])
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-5)


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(rng):
    logits = rng.normal(size=(3, 30)).astype(np.float32) * 2
    min_p = np.array([0.0, 0.2, 0.9], np.float32)
    B = logits.shape[0]
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.zeros(B, jnp.int32), jnp.ones(B, jnp.float32),
                                   jnp.asarray(min_p)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = probs >= min_p[:, None] * probs.max(-1, keepdims=True)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    assert keep[0].all() and keep[2].sum() < keep[1].sum()


@pytest.fixture(scope="module")
def tiny():
    return model("llama-tiny")


@pytest.fixture(scope="module")
def prompts(tiny):
    cfg, _ = tiny
    rng = np.random.default_rng(1)
    lens = np.array([6, 4, 5], np.int32)
    tok = np.zeros((3, S), np.int32)
    for b, n in enumerate(lens):
        tok[b, :n] = rng.integers(0, cfg.vocab_size, n)
    return tok, lens


@pytest.fixture(scope="module")
def eos(tiny, prompts):
    """Row 2's first plain greedy token: an EOS that would end it at once without min_tokens."""
    cfg, params = tiny
    tok, lens = prompts
    return int(np.asarray(kvjax.generate(cfg, params, tok, lens, max_new_tokens=1).tokens)[2, 0])


def reference(cfg, params, tok, lens, eos, count_generated=True):
    """Greedy with the rules on every step's logits (full forward passes of one shape).
    count_generated=False: a deliberately wrong rule that forgets the generated tokens
    (penalties on the prompt only), to show the tests can tell."""
    B, W = tok.shape[0], S + N
    buf = np.zeros((B, W), np.int32)
    buf[:, :S] = tok
    out = [[] for _ in range(B)]
    done = [False] * B
    for i in range(N):
        cur = np.asarray(lens) + i
        logits = np.asarray(kvjax.forward(cfg, params, buf, cur))
        for b in range(B):
            if done[b]:
                continue
            row = {k: v[b] for k, v in SETTINGS.items()}
            x = np_controls(logits[b, cur[b] - 1], tok[b, :lens[b]].tolist(), out[b] if count_generated else [],
                            row["presence_penalty"],
                            row["frequency_penalty"], row["repetition_penalty"], row["logit_bias"],
                            row["min_tokens"] - (0 if count_generated else len(out[b])), [eos])
            t = int(np.argmax(x))
            out[b].append(t)
            buf[b, cur[b]] = t
            done[b] = t == eos
    return out


@pytest.fixture(scope="module")
def expected(tiny, prompts, eos):
    cfg, params = tiny
    return reference(cfg, params, *prompts, eos)


def emitted(out):
    toks, n = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[b, :n[b]].tolist() for b in range(toks.shape[0])]


def test_generate_with_controls_equals_the_reference(tiny, prompts, eos, expected):
    cfg, params = tiny
    out = kvjax.generate(cfg, params, *prompts, max_new_tokens=N, eos_token_id=eos, **SETTINGS)
    assert emitted(out) == expected
    assert len(expected[2]) >= 6 and eos not in expected[2][:5]     # min_tokens held EOS back
    plain = emitted(kvjax.generate(cfg, params, *prompts, max_new_tokens=N, eos_token_id=eos))
    assert plain != expected and plain[2] == [eos]                 # the controls changed the tokens
    wrong = reference(cfg, params, *prompts, eos, count_generated=False)
    assert wrong[0] != expected[0] and wrong[1] != expected[1]     # rows 0 and 1 depend on the counts


def test_new_control_values_do_not_recompile(tiny, prompts, eos):
    cfg, params = tiny
    settings = dict(SETTINGS, presence_penalty=[0.3, 0.1, -0.2], logit_bias=[{5: 1.0}, {6: 2.0}, None])
    kvjax.generate(cfg, params, *prompts, max_new_tokens=N, eos_token_id=eos, **SETTINGS)
    before = kvjax.decode.programs.generate_program._cache_size()
    kvjax.generate(cfg, params, *prompts, max_new_tokens=N, eos_token_id=eos, **settings)
    assert kvjax.decode.programs.generate_program._cache_size() == before


def test_speculative_generate_with_controls_decodes_plainly(tiny, prompts, eos, expected):
    cfg, params = tiny
    out = kvjax.generate(cfg, params, *prompts, max_new_tokens=N, eos_token_id=eos,
                         speculate=kvjax.PromptLookup(num_tokens=3), **SETTINGS)
    assert emitted(out) == expected
    assert int(np.asarray(out.stats.proposed).sum()) == 0


def test_sampled_rows_obey_bias_and_min_p(tiny, prompts):
    cfg, params = tiny
    tok, lens = prompts
    key = jax.random.key(3)
    biased = kvjax.generate(cfg, params, tok, lens, max_new_tokens=N, temperature=1.0, key=key,
                            logit_bias={7: 100.0})
    assert (np.asarray(biased.tokens) == 7).all()
    greedy = kvjax.generate(cfg, params, tok, lens, max_new_tokens=N)
    only_top = kvjax.generate(cfg, params, tok, lens, max_new_tokens=N, temperature=2.0, key=key, min_p=1.0)
    np.testing.assert_array_equal(np.asarray(only_top.tokens), np.asarray(greedy.tokens))


def test_ignore_eos_runs_every_row_to_max_new_tokens(tiny, prompts, eos):
    cfg, params = tiny
    out = kvjax.generate(cfg, params, *prompts, max_new_tokens=4, eos_token_id=eos, ignore_eos=True)
    assert (np.asarray(out.lengths) == 4).all()


@pytest.fixture(scope="module")
def engine(tiny):
    cfg, params = tiny
    with kvjax.Engine(cfg, params, max_slots=4, max_len=32, page_size=4, decode_steps=3, prefill_chunk=8) as eng:
        yield eng


def request(b, eos, **changes):
    row = {k: v[b] for k, v in SETTINGS.items()}
    return kvjax.SamplingParams(max_tokens=N, stop_token_ids=(eos,), **dict(row, **changes))


def test_engine_with_controls_equals_the_reference(tiny, prompts, eos, expected, engine):
    tok, lens = prompts
    done = engine.generate([tok[b, :lens[b]].tolist() for b in range(3)], [request(b, eos) for b in range(3)])
    assert [c.tokens for c in done] == expected
    # a request that keeps the defaults beside them is unaffected
    plain = engine.generate([tok[0, :lens[0]].tolist()], kvjax.SamplingParams(max_tokens=N))
    ref = kvjax.generate(*tiny, tok[:1], lens[:1], max_new_tokens=N)
    assert plain[0].tokens == np.asarray(ref.tokens)[0].tolist()


def test_engine_chained_calls_carry_the_counts(tiny, prompts, expected, engine):
    """Without stop tokens the engine chains decode calls on the device (chain_decode): the
    token counts must travel from one call to the next."""
    tok, lens = prompts
    assert len(expected[0]) == len(expected[1]) == N          # rows 0 and 1 never hit the EOS
    sps = [kvjax.SamplingParams(max_tokens=N, **{k: v[b] for k, v in SETTINGS.items()}) for b in range(2)]
    before = engine.stats()["decode_calls"]
    done = engine.generate([tok[b, :lens[b]].tolist() for b in range(2)], sps)
    assert [c.tokens for c in done] == expected[:2]
    assert engine.stats()["decode_calls"] - before >= 3       # N - 1 tokens in calls of 3 steps


def test_engine_control_values_are_traced_and_sampling_obeys_them(tiny, prompts, eos, engine):
    tok, lens = prompts
    prompts_ = [tok[b, :lens[b]].tolist() for b in range(3)]
    engine.generate(prompts_, [request(b, eos) for b in range(3)])
    before = engine.stats()["compilations"]
    sps = [request(b, eos, presence_penalty=0.25 * b, repetition_penalty=1.1) for b in range(3)]
    engine.generate(prompts_, sps)
    assert engine.stats()["compilations"] == before
    hot = kvjax.SamplingParams(max_tokens=N, temperature=1.0, seed=5, logit_bias={9: 100.0})
    assert engine.generate([prompts_[0]], hot)[0].tokens == [9] * N


@pytest.mark.parametrize("bad, param", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=N + 1), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias"), (dict(logit_bias={1: 101.0}), "logit_bias"),
    (dict(logit_bias={"1": 1.0}), "logit_bias")])
def test_bad_controls_are_refused_naming_the_parameter(tiny, prompts, engine, bad, param):
    cfg, params = tiny
    with pytest.raises(ValueError, match=param):
        kvjax.generate(cfg, params, *prompts, max_new_tokens=N, **bad)
    with pytest.raises(ValueError, match=param):
        engine.submit([1, 2, 3], kvjax.SamplingParams(max_tokens=N, **bad))
