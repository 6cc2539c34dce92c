"""kvjax.timing and kvjax.bench: the measuring method itself, checked against known work.

A sleep of known length must measure as that length (per call and per unit), a
calibrated measurement must last about min_seconds, impossible or noisy results must be
marked invalid (never clamped), and the timed decode program must be generate's own
decode loop: same tokens, no compilation inside the timed region, cache rewound per call.
"""
import time

import jax
import numpy as np
import pytest

import kvjax
from kvjax.bench import time_decode, time_decode_step, time_prefill
from kvjax.timing import Timing, compile_watch, measure, measure_interleaved


def test_a_known_sleep_measures_as_itself():
    # sleep(d) lasts at least d; scheduler overshoot is small next to 5 ms on an idle or busy machine
    _, t = measure(lambda _: time.sleep(0.005), units=5, repeats=3, min_seconds=0.05, sync=lambda _: None)
    assert t.calls >= 5                       # calibrated: 0.05 s / 5 ms
    assert 0.001 <= t.median_s < 0.003       # per unit: 5 ms / 5 units
    assert t.min_s <= t.median_s and t.compiles == 0


def test_calibration_reaches_min_seconds():
    calls = []   # a call of a few microseconds: 100k calls (max_calls) outlast min_seconds on any
    #              machine, so the calibration, not the cap, ends it (a bare append took 50 ns on a
    #              quiet VM and hit the cap at 5 ms)
    _, t = measure(lambda _: calls.append(sum(range(300))), repeats=2, min_seconds=0.02, sync=lambda _: None)
    assert t.calls * t.median_s * 2 >= 0.02 * 0.5     # a measurement lasts about min_seconds
    assert len(calls) >= 2 + 2 * t.calls             # first call + calibration + 2 measurements


def test_impossible_and_noisy_results_are_invalid_not_clamped():
    assert not Timing(per_call=[0.0, 1.0, 1.0]).check().valid          # non-positive
    t = Timing(per_call=[1.0, 1.1, 5.0]).check()                       # spread 4 > median 1.1
    assert not t.valid and "spread" in t.reason
    assert t.median_s == 1.1                                           # the number itself is untouched
    assert Timing(per_call=[1.0, 1.2, 1.1]).check().valid
    bad = Timing(per_call=[1.0, 1.0], timed_compiles=1).check()
    assert not bad.valid and "compilation" in bad.reason
    fields = bad.fields("x")
    assert fields["x_valid"] is False and "compilation" in fields["x_invalid_reason"]


def test_compile_watch_counts_compilations():
    f = jax.jit(lambda x: x * 3 + 1)
    with compile_watch() as w:
        f(np.ones(7, np.float32)).block_until_ready()
    if w.seen:
        assert w.compiles == 1 and w.compile_s > 0
    with compile_watch() as w2:
        f(np.ones(7, np.float32)).block_until_ready()
    assert w2.compiles == 0


@pytest.fixture(scope="module")
def tiny():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    return cfg, kvjax.init_params(cfg, jax.random.key(0), std=0.2)


def test_time_decode_times_generates_loop_without_recompiling(tiny):
    cfg, params = tiny
    B, C, N = 2, 12, 6
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, C))
    lens = np.array([C, C - 5])
    cache, t = time_decode(cfg, params, toks, lens, kvjax.init_cache(cfg, B, C + N), N,
                           repeats=2, min_seconds=0.01)
    assert t.units == N and t.valid == (t.spread_s <= t.median_s)
    assert t.timed_compiles == 0                        # one program, reused by every call
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens + N)   # rewound, then N steps
    # The timed cache holds what generate computes: its last call decoded generate's tokens.
    ref = kvjax.generate(cfg, params, toks, lens, max_new_tokens=N, max_len=C + N)
    np.testing.assert_allclose(np.asarray(cache.keys[0]), np.asarray(ref.cache.keys[0]), atol=1e-5)


def test_time_prefill_and_decode_step(tiny):
    cfg, params = tiny
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 9))
    cache, t = time_prefill(cfg, params, toks, [9], kvjax.init_cache(cfg, 1, 16), repeats=2, min_seconds=0.01)
    assert int(cache.lengths[0]) == 9 and t.timed_compiles == 0
    cache, t = time_decode_step(cfg, params, kvjax.init_cache(cfg, 2, 16), at=15, repeats=2, min_seconds=0.01)
    assert (np.asarray(cache.lengths) == 16).all() and t.timed_compiles == 0
    with pytest.raises(ValueError, match=r"at=16 is outside the cache's max_len=16"):
        time_decode_step(cfg, params, kvjax.init_cache(cfg, 1, 16), at=16)
    with pytest.raises(ValueError, match=r"time_decode: row 0 needs 17 cache slots"):
        time_decode(cfg, params, toks, [9], kvjax.init_cache(cfg, 1, 16), 8)


def test_interleaved_alternatives_alternate_and_measure_themselves():
    """Two sleeps of known lengths, measured in turn: each measures as itself, and the
    measurements alternate (ABBA...) rather than running one alternative's all first."""
    log = []

    def sleeper(name, s):
        def call(_):
            log.append(name)
            time.sleep(s)
        return call

    out = measure_interleaved({"a": sleeper("a", 0.002), "b": sleeper("b", 0.006)}, repeats=4,
                              min_seconds=0.02, sync=lambda _: None)
    ta, tb = out["a"][1], out["b"][1]
    assert ta.valid and tb.valid and len(ta.per_call) == len(tb.per_call) == 4
    assert 0.002 <= ta.median_s < 0.004 and 0.006 <= tb.median_s < 0.009
    timed = log[-(4 * ta.calls + 4 * tb.calls):]           # the measurements, after calibration
    runs = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    assert runs == ["a", "b", "a", "b", "a"]          # a b | b a | a b | b a, runs merged
