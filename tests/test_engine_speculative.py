"""kvjax.Engine(speculate=...): each request proposes, verifies and accepts its own number of
tokens per step over the paged pools, and greedy requests give exactly what `kvjax.generate`
gives their prompt alone (the oracle of test_engine.py), whatever else runs, with stop tokens
and max_tokens inside accepted runs, preemption and the prefix cache.

Proposers: prompt lookup (prompts repeat a phrase, so rows propose; a random model rarely
accepts) and the target itself as its own draft (every proposal accepted: multi-token
commits, lookahead pages, the draft's own pools and the cut at max_tokens and stop tokens
are all exercised; an early-exit draft is a DraftModel too). The engine shares
test_engine.py's shapes.
"""
import numpy as np
import pytest

import kvjax
from test_engine import CHUNK, MAX_LEN, N_REF, PAGE, STEPS, check_drained, expect, oracle, tiny  # noqa: F401


def _prompts(cfg, seed=0):
    """Ragged prompts: four repeat a random phrase (prompt lookup finds matches), one does not."""
    rng = np.random.default_rng(seed)
    V = min(cfg.vocab_size, 200)
    rows = []
    for n in (30, 22, 15, 41, 9):
        phrase = [int(t) for t in rng.integers(1, V, 6)]
        rows.append((phrase * 8)[:n])
    rows.append([int(t) for t in rng.integers(1, V, 7)])
    return rows


def _engine(tiny, speculate, **kw):  # noqa: F811
    cfg, params = tiny
    args = dict(max_slots=4, max_len=MAX_LEN, page_size=PAGE, decode_steps=STEPS, prefill_chunk=CHUNK)
    args.update(kw)
    return kvjax.Engine(cfg, params, speculate=speculate, **args)


def _proposers(cfg, params):
    return {"lookup": kvjax.PromptLookup(min_ngram=1, num_tokens=4, max_ngram=3),
            "self_draft": kvjax.DraftModel(cfg, params, num_tokens=4)}


@pytest.mark.parametrize("which", ["lookup", "self_draft"])
def test_greedy_requests_equal_generate(tiny, oracle, which):  # noqa: F811
    """6 ragged requests through 4 slots, mixed max_tokens and stop tokens (one stop token
    inside the oracle's stream, so it may land inside an accepted run): each request's tokens
    and finish reason are the oracle's; the stats count the proposals; nothing leaks."""
    cfg, params = tiny
    prompts = _prompts(cfg)
    refs = [oracle(p) for p in prompts]
    sps = [kvjax.SamplingParams(max_tokens=N_REF if i % 2 else 11 + i,
                                stop_token_ids=(refs[i][7],) if i in (1, 4) else ())
           for i in range(len(prompts))]
    with _engine(tiny, _proposers(cfg, params)[which]) as eng:
        outs = eng.generate(prompts, sps)
        s = eng.stats()
        check_drained(eng)
    for ref, sp, o in zip(refs, sps, outs):
        assert (o.tokens, o.finish_reason) == expect(ref, sp)
    assert s["spec_proposed"] > 0 and s["spec_forwards"] > 0
    assert s["generated_tokens"] == sum(len(o.tokens) for o in outs)
    if which == "self_draft":   # the target as its own draft: every verified proposal is accepted,
        # but the ones after a stop token are not emitted (2 requests stop, each inside one run)
        assert s["spec_proposed"] - 2 * 4 <= s["spec_accepted"] < s["spec_proposed"]
        assert s["spec_tokens_per_forward"] > 3.0
        assert s["decode_calls"] < 12          # plain decoding needs >= 24 / STEPS calls per slot wave


def test_verify_budget_sends_wide_calls_to_plain_decoding(tiny, oracle):  # noqa: F811
    """The cost-aware switch: prompt lookup with max_verify_tokens=8 decodes calls of 2-4 rows
    (10-20 tokens per verify) plainly and speculates only in calls of one row (5), so it
    verifies fewer row-iterations than without a budget; with 4 it never speculates; exact."""
    cfg, _ = tiny
    prompts = _prompts(cfg)[:4]
    sp = kvjax.SamplingParams(max_tokens=N_REF)
    forwards, outs = {}, []
    for budget in (None, 8, 4):
        with _engine(tiny, kvjax.PromptLookup(min_ngram=1, num_tokens=4, max_verify_tokens=budget)) as eng:
            outs += list(zip(prompts, eng.generate(prompts, sp)))
            forwards[budget] = eng.stats()["spec_forwards"]
            check_drained(eng)
    assert forwards[None] > forwards[8] and forwards[4] == 0, forwards
    for p, o in outs:
        assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)


def test_preemption_and_prefix_hits_stay_exact(tiny, oracle):  # noqa: F811
    """A pool too small for 8 requests (preemption, recompute from prompt + generated) and
    repeated prompts (prefix hits): the self-draft's multi-token steps stay exact and every
    page comes back; the draft's pools follow the target's pages through both."""
    cfg, params = tiny
    prompts = _prompts(cfg, seed=3)
    prompts = prompts + prompts[:2]
    sp = kvjax.SamplingParams(max_tokens=N_REF)
    with _engine(tiny, kvjax.DraftModel(cfg, params, num_tokens=4), max_slots=8, num_pages=24) as eng:
        outs = eng.generate(prompts, sp)
        s = eng.stats()
        check_drained(eng)
    for p, o in zip(prompts, outs):
        assert (o.tokens, o.finish_reason) == expect(oracle(p), sp)
    assert s["preemptions"] > 0 and s["pages_peak"] <= 24


def test_logprobs_and_seeded_sampling(tiny):  # noqa: F811
    """Greedy logprobs equal the plain engine's (the target's log-softmax at each emitted
    token); a seeded sampled request gives the same tokens alone or beside others."""
    cfg, params = tiny
    prompts = _prompts(cfg, seed=5)[:3]
    sp = kvjax.SamplingParams(max_tokens=12, logprobs=2)
    with _engine(tiny, None) as plain:
        ref = plain.generate(prompts, sp)
    with _engine(tiny, kvjax.DraftModel(cfg, params, num_tokens=4)) as eng:
        got = eng.generate(prompts, sp)
        hot = kvjax.SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
        alone = eng.generate([prompts[0]], hot)[0].tokens
        crowd = eng.generate(prompts, [hot] + [kvjax.SamplingParams(max_tokens=16, temperature=1.0)] * 2)[0].tokens
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
        for a, b in zip(r.logprobs, g.logprobs):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
            assert list(a.top) == list(b.top)
    assert alone == crowd and len(alone) == 16


def test_bad_speculate_is_refused(tiny):  # noqa: F811
    cfg, params = tiny
    with pytest.raises(ValueError, match="PromptLookup or kvjax.DraftModel"):
        _engine(tiny, "prompt-lookup")
    with pytest.raises(ValueError, match="num_tokens"):
        _engine(tiny, kvjax.PromptLookup(num_tokens=0))
    other = kvjax.DraftModel.early_exit(cfg, params, 1)
    import dataclasses
    bad = dataclasses.replace(other, cfg=dataclasses.replace(other.cfg, vocab_size=cfg.vocab_size + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        _engine(tiny, bad)
