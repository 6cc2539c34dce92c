"""DecodingPress on a long generation in the long-context benchmark (issue 21 part 3):
teacher forcing through DecodingPress's compaction schedule is the oracle the benchmark's
answer log-likelihood rests on.

What would be wrong if it were broken: chunks that end one step before or after the point
where a greedy generation compacts score the answer under a cache no generation holds. The
check: feed each row's own greedy DecodingPress generation back teacher-forced; every token
must come out as the argmax (a generation picks exactly those), for schedules with and
without a compaction right after the question, ragged answers and three base presses; and a
schedule moved by one step must not pass the same check (the test can fail).
"""
import numpy as np
import pytest

import kvjax
from conftest import model
from kvjax import press as P
from kvjax.decode import decoding_segments
from kvjax.runner.kinds.long_press import Config
from kvjax.runner.kinds.long_press import decoding as D
from kvjax.runner.kinds.long_press import scoring

B, CONTEXT, WIDTH, NEW = 3, 48, 16, 30


class Tok:
    def __init__(self, eos=()):
        self.eos_ids = eos

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def setup():
    cfg, params = model("llama-tiny")
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, cfg.vocab_size, (B, CONTEXT)).astype(np.int32)
    lens = np.array([40, 33, 37], np.int32)
    questions = [list(map(int, rng.integers(3, cfg.vocab_size, n))) for n in (5, 9, 7)]
    cache = kvjax.prefill(cfg, params, ctx, lens, kvjax.init_cache(cfg, B, CONTEXT + WIDTH + NEW + 8,
                                                                   hybrid=False))[1]
    return cfg, params, questions, cache


# interval 8 / target 20; a question wider than the target (the prompt compacts); interval 1
PRESSES = [P.DecodingPress(P.KnormPress(), 8, 20), P.DecodingPress(P.KeyDiffPress(), 5, 12),
           P.DecodingPress(P.StreamingLLMPress(n_sink=2), 1, 10)]
IDS = ["knorm_i8_t20", "keydiff_i5_t12_prompt_compacts", "streaming_i1"]


def _own_generation(setup, press):
    cfg, params, questions, cache = setup
    ids = scoring.greedy_tokens(cfg, params, Tok(), D._copy(cache), questions, NEW, WIDTH, press)
    return [ids[0][:30], ids[1][:21], ids[2][:26]]          # ragged answers


@pytest.mark.parametrize("press", PRESSES[:2], ids=IDS[:2])
def test_host_stepped_greedy_is_generate(setup, press):
    """The benchmark's greedy loop (one program per base press for every ratio) == kvjax.generate,
    also with an EOS that ends rows at different steps."""
    cfg, params, questions, cache = setup
    want = scoring.greedy_tokens(cfg, params, Tok(), D._copy(cache), questions, NEW, WIDTH, press)
    assert D.greedy(cfg, params, D._copy(cache), press, questions, NEW, WIDTH) == want
    eos = want[1][12]                                     # row 1 stops at its 13th token
    want = scoring.greedy_tokens(cfg, params, Tok((eos,)), D._copy(cache), questions, NEW, WIDTH, press)
    assert len(want[1]) <= 12
    assert D.greedy(cfg, params, D._copy(cache), press, questions, NEW, WIDTH, (eos,)) == want


@pytest.mark.parametrize("press", PRESSES, ids=IDS)
def test_teacher_forcing_reproduces_the_generation(setup, press):
    cfg, params, questions, cache = setup
    answers = _own_generation(setup, press)
    lp, hit, alen = D.teacher_forced(cfg, params, D._copy(cache), press, questions, answers, WIDTH)
    assert list(alen) == [30, 21, 26]
    for r in range(B):
        assert hit[r, :alen[r]].all() and not hit[r, alen[r]:].any()
        assert np.all(lp[r, :alen[r]] < 0) and np.all(lp[r, alen[r]:] == 0)


def test_a_shifted_schedule_is_caught(setup, monkeypatch):
    cfg, params, questions, cache = setup
    press = P.DecodingPress(P.KnormPress(), 8, 20)
    answers = _own_generation(setup, press)
    right = D.schedule(press, 29, WIDTH)
    shifted = [(max(0, a - 1) if i else 0, b - 1 if c else b, c) for i, (a, b, c) in enumerate(right)]
    monkeypatch.setattr(D, "schedule", lambda *a: shifted)
    _, hit, alen = D.teacher_forced(cfg, params, D._copy(cache), press, questions, answers, WIDTH)
    assert not all(hit[r, :alen[r]].all() for r in range(B))


@pytest.mark.parametrize("interval, target, width", [(8, 20, 16), (5, 12, 16), (1, 10, 16), (32, 4, 40)])
def test_schedule_covers_every_step_and_compacts_where_generate_does(interval, target, width):
    press = P.DecodingPress(P.KnormPress(), interval, target)
    chunks = D.schedule(press, 100, width)
    assert chunks[0][0] == 0 and chunks[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    ends = [b for _, b, c in chunks if c]
    want, at = [], 0
    for seg in decoding_segments(100, press, width):
        for _ in range(seg.repeat):
            at += seg.steps
            if seg.compress:
                want.append(at)
    prompt = [0] if width >= target or interval == 1 else []
    assert ends == prompt + want


def test_agreement():
    assert D.agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert D.agreement([1, 9, 3], [1, 2, 3, 4]) == 0.25
    assert D.agreement([1, 2], [1, 2, 3, 4]) == 0.5 and D.agreement([], []) == 1.0


def test_decoding_press_keeps_its_share_of_the_context():
    c = Config(n_sink=4)
    p = D.make_decoding_press("StreamingLLM", 0.75, 16, 1000, c)
    assert p.target_size == 250 and p.compression_interval == 16 and p.base_press.n_sink == 4
    assert D.make_decoding_press("Knorm", 0.99, 8, 50, c).target_size == 1


def test_a_compaction_that_keeps_everything_changes_nothing(setup):
    """target_size above every row's tokens: each compaction keeps all, so the teacher-forced
    log-probabilities equal dense's (a compaction that moved positions or slots would not)."""
    cfg, params, questions, cache = setup
    answers = _own_generation(setup, None)
    dense = D.teacher_forced(cfg, params, D._copy(cache), None, questions, answers, WIDTH)[0]
    keep_all = P.DecodingPress(P.KnormPress(), 8, CONTEXT + WIDTH + NEW)
    lp = D.teacher_forced(cfg, params, D._copy(cache), keep_all, questions, answers, WIDTH)[0]
    np.testing.assert_allclose(lp, dense, atol=2e-5)
