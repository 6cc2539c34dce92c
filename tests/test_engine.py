"""kvjax.Engine: continuous batching over a paged cache gives each request exactly what
`kvjax.generate` gives its prompt alone (greedy), whatever else is in flight, the pool size,
preemption or a prefix hit; pages are accounted for; bad input fails up front.

Oracle: `kvjax.generate` on one prompt (dense cache, same max_len). Weights at std 0.2
(conftest.INIT_STD) so the greedy argmax is decisive and float32 reduction-order noise
(~1e-6 relative: the engine attends over a paged view of another width, in batches of
other sizes) cannot flip a token.

Every engine here shares one shape (max_len, page_size, decode_steps, prefill_chunk, and,
except the preemption case, num_pages), so compiled programs are reused across tests.
"""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import model
from kvjax.cache import paged

MAX_LEN, PAGE, STEPS, CHUNK = 96, 8, 4, 32
N_REF = 24            # oracle tokens per prompt (requests ask for at most this many)
WIDTH = 48            # oracle prompt width (prompts are at most this long)


@pytest.fixture(scope="module")
def tiny():
    return model("llama-tiny")


@pytest.fixture(scope="module")
def oracle(tiny):
    """prompt tuple -> the first N_REF greedy tokens of kvjax.generate on that prompt alone."""
    cfg, params = tiny
    memo = {}

    def ref(prompt):
        key = tuple(prompt)
        if key not in memo:
            padded = np.zeros((1, WIDTH), np.int32)
            padded[0, :len(prompt)] = prompt
            out = kvjax.generate(cfg, params, padded, prompt_lengths=[len(prompt)], max_new_tokens=N_REF,
                                 max_len=MAX_LEN)
            memo[key] = [int(t) for t in np.asarray(out.tokens[0])]
        return memo[key]
    return ref


def expect(ref_tokens, sp):
    """What a request with these settings must produce from the oracle's greedy stream."""
    out = []
    for t in ref_tokens[:sp.max_tokens]:
        out.append(t)
        if t in sp.stop_token_ids:
            return out, "stop"
    return out, "length"


def make_engine(tiny, **kw):
    cfg, params = tiny
    args = dict(max_slots=4, max_len=MAX_LEN, page_size=PAGE, decode_steps=STEPS, prefill_chunk=CHUNK)
    args.update(kw)
    return kvjax.Engine(cfg, params, **args)


@pytest.fixture(scope="module")
def engine(tiny):
    with make_engine(tiny) as eng:
        yield eng


def prompts_of(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in lengths]


def check_drained(eng):
    s = eng.stats()
    assert s["running"] == 0 and s["waiting"] == 0
    assert s["pages_used"] == s["pages_cached"] and s["pages_in_use"] == 0   # only the prefix cache holds pages
    assert all(r == 0 for r in eng.pool.refs)


# ----------------------------------------------------------------------------- paged attention

def test_reference_paged_attention_equals_dense(rng):
    """write_pages + attend_pages on a random page table == dot attention on the dense K/V."""
    from kvjax.attention_math import attention_mask, dot_attention, scores
    B, T, N, K, H, Z, W, P = 3, 5, 4, 2, 8, 4, 6, 40
    S = W * Z
    starts = np.array([0, 7, 17], np.int32)
    lengths = np.array([5, 3, 1], np.int32)
    table = rng.permutation(P)[:B * W].reshape(B, W).astype(np.int32)   # each row its own pages
    dense_k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    dense_v = rng.standard_normal((B, K, S, H)).astype(np.float32)
    k_pool = rng.standard_normal((P, K, Z, H)).astype(np.float32)    # garbage everywhere else
    v_pool = rng.standard_normal((P, K, Z, H)).astype(np.float32)
    for b in range(B):                                                 # history before the chunk
        for w in range(W):
            k_pool[table[b, w]] = dense_k[b, :, w * Z:(w + 1) * Z]
            v_pool[table[b, w]] = dense_v[b, :, w * Z:(w + 1) * Z]
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k_new = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v_new = rng.standard_normal((B, T, K, H)).astype(np.float32)
    positions = starts[:, None] + np.arange(T, dtype=np.int32)[None, :]
    cache = paged.paged_cache((jnp.asarray(k_pool),), (jnp.asarray(v_pool),), jnp.asarray(starts),
                              jnp.asarray(table))
    out, new = paged.paged_attention(q, k_new, v_new, positions, lengths, cache, 0, None, 0, scores)

    for b in range(B):                                                 # the dense oracle
        for t in range(lengths[b]):
            dense_k[b, :, starts[b] + t], dense_v[b, :, starts[b] + t] = k_new[b, t], v_new[b, t]
    k_pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    mask = attention_mask(positions, k_pos, k_pos < (starts + lengths)[:, None])
    want = dot_attention(q, dense_k, dense_v, mask[:, 0])
    real = np.arange(T)[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
    got_k = np.asarray(paged.gather_pages(new["k"], table))
    np.testing.assert_array_equal(got_k, dense_k)                       # written exactly, padding dropped
    untouched = np.setdiff1d(np.arange(P), table)
    np.testing.assert_array_equal(np.asarray(new["v"])[untouched], v_pool[untouched])


# ----------------------------------------------------------------------------- exactness

def test_ragged_workload_equals_generate_per_request(tiny, engine, oracle):
    cfg, _ = tiny
    lengths = [5, 17, 33, 3, 40, 9, 26, 12, 1, 48]
    prompts = prompts_of(cfg, lengths)
    sps = [kvjax.SamplingParams(max_tokens=m) for m in (12, 3, 20, 7, 24, 1, 16, 9, 24, 5)]
    outs = engine.generate(prompts, sps)
    for p, sp, o in zip(prompts, sps, outs):
        assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)
        assert o.prompt_tokens == len(p)
    s = engine.stats()
    assert s["generated_tokens"] >= sum(len(o.tokens) for o in outs)
    assert s["compilations"] >= 1
    check_drained(engine)


def test_stop_tokens_end_requests(tiny, engine, oracle):
    cfg, _ = tiny
    prompts = prompts_of(cfg, [6, 11, 20], seed=1)
    sps = []
    for i, p in enumerate(prompts):
        ref = oracle(p)
        stop = ref[3 + 2 * i]                  # a token the greedy stream emits
        sps.append(kvjax.SamplingParams(max_tokens=N_REF, stop_token_ids=(stop, cfg.vocab_size - 1)))
    outs = engine.generate(prompts, sps)
    for p, sp, o in zip(prompts, sps, outs):
        want = expect(oracle(p), sp)
        assert want[1] == "stop"
        assert (o.tokens, o.finish_reason) == want
    check_drained(engine)


def test_prefix_hits_are_exact_and_skip_compute(tiny, engine, oracle):
    cfg, _ = tiny
    system = prompts_of(cfg, [32], seed=2)[0]               # 4 full pages shared by every request
    tails = prompts_of(cfg, [3, 9, 5, 14], seed=3)
    prompts = [system + t for t in tails]
    sp = kvjax.SamplingParams(max_tokens=10)
    before = engine.stats()
    # all at once: the first computes the prefix, the others wait for its pages, then share them
    outs = engine.generate(prompts, sp)
    after = engine.stats()
    for p, o in zip(prompts, outs):
        assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)
    assert [o.cached_tokens for o in outs] == [0, 32, 32, 32]
    computed = after["prefill_tokens_computed"] - before["prefill_tokens_computed"]
    assert computed == sum(len(p) for p in prompts) - 3 * 32
    assert after["prefix_hits"] - before["prefix_hits"] == 12
    # a finished request's pages stay cached; a prompt that is all cache still computes its
    # last page (its logits need one real token)
    again = engine.generate([prompts[0], system], sp)
    assert again[0].tokens == outs[0].tokens and again[0].cached_tokens == 32
    assert (again[1].tokens, again[1].cached_tokens) == (expect(oracle(system), sp)[0], 24)
    check_drained(engine)


def test_preemption_with_a_small_pool_is_exact_and_leaks_nothing(tiny, oracle):
    cfg, _ = tiny
    lengths = [30, 41, 25, 36, 44, 28, 33, 39]
    prompts = prompts_of(cfg, lengths, seed=4)
    sp = kvjax.SamplingParams(max_tokens=N_REF)
    # 8 requests of up to 9 pages each, 30 pages: the pool runs dry while they decode.
    with make_engine(tiny, max_slots=8, num_pages=30, prefix_cache=False) as eng:
        outs = eng.generate(prompts, sp)
        s = eng.stats()
        assert s["preemptions"] > 0
        assert s["pages_peak"] <= 30
        for p, o in zip(prompts, outs):
            assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)
        assert s["prefill_tokens_computed"] > s["prompt_tokens"]       # preempted work was recomputed
        check_drained(eng)
        assert s["pages_used"] == 0


def test_per_layer_windows_and_softcap_equal_generate():
    """gemma2-tiny: sliding and full layers alternate (window 8, shorter than the prompts),
    soft-capped scores and logits, sandwich norms: the paged path reads attention.py's own
    per-layer pattern and scores, so it matches generate (whose cache has rings on the
    windowed layers)."""
    cfg, params = model("gemma2-tiny")
    prompts = prompts_of(cfg, [5, 30, 19], seed=9)
    with kvjax.Engine(cfg, params, max_slots=4, max_len=64, page_size=8, decode_steps=4,
                      prefill_chunk=16) as eng:
        outs = eng.generate(prompts, kvjax.SamplingParams(max_tokens=12))
    for p, o in zip(prompts, outs):
        ref = kvjax.generate(cfg, params, np.array([p]), max_new_tokens=12, max_len=64)
        assert o.tokens == [int(t) for t in np.asarray(ref.tokens[0])]


# ----------------------------------------------------------------------------- asynchronous use

def test_submit_iterate_cancel_and_threads(tiny, engine, oracle):
    cfg, _ = tiny
    p1, p2, p3 = prompts_of(cfg, [7, 13, 21], seed=5)
    sp = kvjax.SamplingParams(max_tokens=20, logprobs=3)
    h1 = engine.submit(p1, sp)
    long = engine.submit(p2, kvjax.SamplingParams(max_tokens=80))
    # cancel `long` as soon as its first token is out (80 tokens take 10 decode calls; the
    # cancel lands at the next call boundary), while h1 runs on beside it
    assert next(iter(long)) == oracle(p2)[0]
    long.cancel()
    streamed = list(h1)                                     # blocks until h1 is done
    res = h1.result(timeout=60)
    assert h1.done and streamed == res.tokens == expect(oracle(p1), sp)[0]
    assert len(h1.logprobs) == len(res.tokens) == len(res.logprobs)
    for lp, t in zip(res.logprobs, res.tokens):
        assert lp.token == t and list(lp.top)[0] == t and len(lp.top) == 3   # greedy: the top one
        assert lp.logprob == pytest.approx(lp.top[t]) and lp.logprob <= 0
    out = long.result(timeout=60)
    assert out.finish_reason == "abort" and 1 <= len(out.tokens) < 80
    n = min(len(out.tokens), N_REF)
    assert out.tokens[:n] == oracle(p2)[:n]
    # submissions from several threads at once
    results = {}

    def worker(i, p):
        results[i] = engine.submit(p, kvjax.SamplingParams(max_tokens=5)).result(timeout=120)
    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate((p1, p2, p3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate((p1, p2, p3)):
        assert results[i].tokens == oracle(p)[:5]
    check_drained(engine)


def test_close_without_drain_aborts_what_is_in_flight(tiny):
    cfg, _ = tiny
    eng = make_engine(tiny)                         # same shapes as the module's engine: no compile
    h = eng.submit(prompts_of(cfg, [10], seed=10)[0], kvjax.SamplingParams(max_tokens=80))
    next(iter(h))
    eng.close(drain=False)
    out = h.result(timeout=60)
    assert out.finish_reason == "abort" and len(out.tokens) < 80
    assert eng.stats()["pages_in_use"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit([1, 2], kvjax.SamplingParams())


def test_seeded_sampling_is_reproducible_whatever_runs_alongside(tiny, engine):
    cfg, _ = tiny
    p, *others = prompts_of(cfg, [9, 4, 30, 15], seed=6)
    sp = kvjax.SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    alone = engine.generate([p], sp)[0].tokens
    crowd = engine.generate([*others, p, p], [kvjax.SamplingParams(max_tokens=12, temperature=0.7)] * 3 + [sp, sp])
    assert crowd[3].tokens == alone and crowd[4].tokens == alone
    other_seed = engine.generate([p], kvjax.SamplingParams(max_tokens=12, temperature=1.0, top_k=50,
                                                           top_p=0.9, seed=124))[0].tokens
    assert other_seed != alone


def test_prompt_logprobs_equal_forward(tiny, engine):
    cfg, params = tiny
    p = prompts_of(cfg, [37], seed=7)[0]
    out = engine.generate([p], kvjax.SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    logits = np.asarray(kvjax.forward(cfg, params, np.array([p])))[0]
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for t in range(1, len(p)):
        got = out.prompt_logprobs[t]
        assert got.token == p[t]
        assert got.logprob == pytest.approx(lp[t - 1, p[t]], abs=2e-4)
        assert list(got.top) == list(np.argsort(-lp[t - 1])[:2])
    assert out.cached_tokens == 0


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_before_anything_runs(tiny, engine, oracle):
    cfg, _ = tiny
    good = prompts_of(cfg, [5], seed=8)[0]
    sp = kvjax.SamplingParams(max_tokens=4)
    before = engine.stats()
    cases = [
        ([good, []], sp, r"request 1: the prompt is empty"),
        ([good, [1] * MAX_LEN], sp, rf"request 1: the prompt has {MAX_LEN} tokens but max_len={MAX_LEN}"),
        ([good, [3, cfg.vocab_size]], sp, rf"request 1: prompt token 1 is {cfg.vocab_size}, outside the vocabulary \[0, {cfg.vocab_size}\)"),
        ([good], kvjax.SamplingParams(max_tokens=0), r"request 0: max_tokens must be an int >= 1, got 0"),
        ([good], kvjax.SamplingParams(temperature=-1.0), r"request 0: temperature"),
        ([good], kvjax.SamplingParams(top_p=0.0), r"request 0: top_p"),
        ([good], kvjax.SamplingParams(logprobs=21), r"request 0: logprobs must be None or an int in \[0, 20\]"),
        ([good], kvjax.SamplingParams(stop_token_ids=(-1,)), r"request 0: stop token -1"),
        ([good], kvjax.SamplingParams(top_k=2**31, temperature=1.0), r"request 0: top_k must be an int in \[0, 2147483647\]"),
        ([good], kvjax.SamplingParams(temperature=1e-30), r"request 0: temperature must be 0 \(greedy\) or in"),
    ]
    for prompts, s, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.generate(prompts, s)
    with pytest.raises(ValueError, match="request: the prompt is empty"):
        engine.submit([], sp)
    assert engine.stats()["prompt_tokens"] == before["prompt_tokens"]       # nothing ran
    # a pool too small for one request
    with pytest.raises(ValueError, match=r"request 0: prompt \(40\) \+ max_tokens \(24\) needs 8 pages of "
                                         r"8 tokens but the pool has num_pages=4"):
        make_engine(tiny, num_pages=4).generate([[1] * 40], kvjax.SamplingParams(max_tokens=24))
    assert engine.generate([good], sp)[0].tokens == oracle(good)[:4]         # still serving


def test_warm_up_compiles_every_shape(tiny, oracle):
    """Engine.warm_up builds every prefill and decode program a request can need: a ragged
    burst afterwards (prompt lengths 1-70, logprobs on some, sampled and greedy) compiles
    nothing, its greedy answers stay exact, and a second warm-up builds nothing."""
    cfg, _ = tiny
    rng = np.random.default_rng(5)
    with make_engine(tiny) as eng:
        eng.warm_up()
        before = eng.stats()["compilations"]
        prompts = prompts_of(cfg, [int(n) for n in rng.integers(1, 48, 10)], seed=9)
        sps = [kvjax.SamplingParams(max_tokens=N_REF, logprobs=2 if i % 3 == 0 else None,
                                    temperature=float(i % 2)) for i in range(10)]
        outs = eng.generate(prompts, sps)
        assert eng.stats()["compilations"] == before
        for p, sp, o in zip(prompts, sps, outs):
            if sp.temperature == 0:
                assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)
        assert eng.warm_up() == 0
        check_drained(eng)


def test_a_request_failing_inside_the_engine_fails_alone(tiny, engine, oracle, caplog):
    """A fault in an iteration (injected: any decode call holding the poisoned request raises,
    after the pools were donated, as a device error would) fails that request alone, logged
    with its id; the requests batched with it are rerun one at a time and finish with exactly
    generate's tokens; no page leaks, the prefix cache keeps working and so does the engine."""
    cfg, _ = tiny
    prompts = prompts_of(cfg, [20, 27, 33, 24, 30], seed=11)    # 4 slots: the fifth waits meanwhile
    sp = kvjax.SamplingParams(max_tokens=N_REF)
    runner, real = engine.runner, engine.runner.dispatch_decode

    def faulty(step, prev=None):
        call = real(step, prev) if prev is not None else real(step)
        if any(s.req.prompt == prompts[3] for s in step.seqs):   # the last suspect to rerun alone
            engine.runner.keys[0].delete()          # as a failed donated call leaves the pools
            raise RuntimeError("injected device fault")
        return call

    runner.dispatch_decode = faulty
    try:
        with caplog.at_level("ERROR", logger="kvjax.engine"):
            handles = [engine.submit(p, sp) for p in prompts]
            results = []
            for h in handles:
                try:
                    results.append(h.result(timeout=300))
                except RuntimeError as e:
                    results.append(e)
    finally:
        runner.dispatch_decode = real
    assert isinstance(results[3], RuntimeError) and "injected device fault" in str(results[3])
    assert f"request {handles[3].request_id} failed alone" in caplog.text
    for p, r in zip(prompts[:3] + prompts[4:], results[:3] + results[4:]):
        assert (r.tokens, r.finish_reason) == expect(oracle(p), sp)
    assert engine.stats()["failed"] >= 1 and engine.scheduler.max_slots == engine.max_slots
    check_drained(engine)
    again = engine.generate(prompts[:2], sp)                      # batching again, prefix hits exact
    assert [o.tokens for o in again] == [expect(oracle(p), sp)[0] for p in prompts[:2]]
    assert engine.stats()["running"] == 0


# ----------------------------------------------------------------------------- serving_bench

def test_serving_bench_runs_through_the_runner(tmp_path):
    import json
    from pathlib import Path

    from kvjax.cli import main
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    sets = ["serving_bench.requests=4", "serving_bench.prompt_len=[4, 9]", "serving_bench.output_len=[2, 8]",
            "serving_bench.arrival_rate=0", "serving_bench.shared_prefix=32", "serving_bench.suffix_len=[2, 4]",
            "serving_bench.max_slots=2", "serving_bench.page_size=8", "serving_bench.static_batch=2",
            "serving_bench.decode_steps=4", "serving_bench.prefill_chunk=32", "serving_bench.repeats=1",
            "serving_bench.same_memory_slots=3"]
    args = ["run", str(root / "experiments" / "serving_bench.yaml"), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert (out / "COMPLETE").exists() and (out / "serving_bench.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["scenario"], r["system"]) for r in rows} == {
        (s, m) for s in ("mixed", "same_memory", "shared_prefix") for m in ("engine", "static")}
    assert (summary["mixed_same_tokens"] == summary["shared_prefix_same_tokens"]
            == summary["same_memory_same_tokens"] == "4/4")   # greedy: equal
    # same_memory: the engine's pool is the static batches' peak allocation, rounded up to pages
    same = {r["system"]: r for r in rows if r["scenario"] == "same_memory"}
    assert same["engine"]["pages_total"] == -(-same["static"]["peak_kv_tokens"] // 8)
    # 3 of 4 prompts share the 32-token prefix (4 pages of 8) with the first
    engine = next(r for r in rows if r["scenario"] == "shared_prefix" and r["system"] == "engine")
    assert engine["cached_tokens"] == 3 * 32
    assert summary["shared_prefix_computed_fraction"] == pytest.approx(
        engine["prefill_tokens_computed"] / engine["prompt_tokens"])
    for r in rows:
        assert r["tok_s"] > 0 and r["ttft_p50_ms"] > 0
