"""The engine's Scheduler (kvjax/engine/scheduler.py) on the host alone: made-up requests, a
fake model, milliseconds.

Oracle: a fake runner that behaves as the compiled programs do, on a fake pool that stores
token ids instead of keys and values. Its "model" samples token i of a request as a fixed
function of (request seed, i), as the engine's seeded sampling does, so every request must
get exactly its own stream, cut at its first stop token or at max_tokens, whatever was
preempted, chained, shared or cancelled around it. Before every row it computes, the fake
reads the row's history back through the step's page table and asserts it is the request's
own tokens (a prefix-cache hit on a wrong page, a page freed while in use, or a missing
page fails here), and it asserts every token it writes has a page. After every step: the
pool's invariants (test_page_pool.check), reference counts equal to the running requests'
page lists, and preemption takes the most recently admitted first. At the end: nothing
held but the prefix cache. A Hypothesis property drives random workloads, submissions and
cancels through all of it; hand-worked cases pin admission, prefix sharing and chaining.
"""
import ast
import json
import pathlib
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax.engine.api import SamplingParams
from kvjax.engine.scheduler import (MIN_CHUNK, DecodeStep, Phase, PrefillStep, Scheduler, chunk_bucket)
from test_page_pool import check as check_pool

ROOT = pathlib.Path(__file__).resolve().parents[1]
V = 16      # fake vocabulary
X = 4       # fake top log-probabilities per position


def stream(seed: int, i: int) -> int:
    """The fake model's token i of a request with this seed (its whole context is its own)."""
    return hash((seed, i, 12345)) % V


def expected(req) -> list:
    out = []
    while len(out) < req.max_n:
        out.append(stream(req.seed, len(out)))
        if out[-1] in req.stops:
            break
    return out


# ----------------------------------------------------------------------------- the fake runner

class FakeCall:
    def __init__(self, step, state, out):
        self.step, self.state, self.out = step, state, out


class FakeRunner:
    """prefill / dispatch_decode / collect as runner.Runner, over a pool of token ids."""

    def __init__(self, sched: Scheduler):
        self.s = sched
        self.kv = np.full((sched.num_pages, sched.page_size), -1, np.int64)

    def _check_shapes(self, step, B):
        s = self.s
        assert B == max(1 << (len(step.seqs) - 1).bit_length(), s.min_rows)         # pow2 rows
        assert step.table.shape[0] == B and step.table.shape[1] <= s.pages_per_seq
        for b, seq in enumerate(step.seqs):
            row = step.table[b]
            assert list(row[:len(seq.pages)]) == seq.pages[:len(row)]
            assert (row[len(seq.pages):] == s.num_pages).all()

    def _history(self, b, step, upto: int, req):
        """Positions [0, upto) of row b read through the page table == the request's tokens."""
        Z = self.s.page_size
        got = [int(self.kv[step.table[b, p // Z], p % Z]) for p in range(upto)]
        want = (req.prompt + [stream(req.seed, i) for i in range(upto)])[:upto]
        assert got == want, f"request {req.id}: history {got} != {want}"

    def _write(self, b, step, pos: int, token: int):
        Z, W = self.s.page_size, step.table.shape[1]
        assert pos // Z < W and step.table[b, pos // Z] < self.s.num_pages, "a token without a page"
        self.kv[step.table[b, pos // Z], pos % Z] = token

    def prefill(self, step: PrefillStep) -> dict:
        B, T = step.tokens.shape
        self._check_shapes(step, B)
        assert T in (chunk_bucket(int(step.lengths.max())), max(self.s.prefill_chunk, MIN_CHUNK))
        out = {"token": np.zeros(B, np.int32)}
        for b, seq in enumerate(step.seqs):
            req, k, start = seq.req, int(step.lengths[b]), int(step.starts[b])
            self._history(b, step, start, req)
            for t in range(k):
                self._write(b, step, start + t, int(step.tokens[b, t]))
            self._history(b, step, start + k, req)
            assert int(step.index[b]) == len(req.generated)
            out["token"][b] = stream(int(step.sampling["seed"][b]), int(step.index[b]))
        if step.logprobs:
            out["logprob"] = -np.ones(B, np.float32)
            out["top"], out["top_ids"] = -np.ones((B, X), np.float32), np.tile(out["token"][:, None], (1, X))
        if step.prompt_logprobs:
            out["p_logprob"] = -np.ones((B, T), np.float32)
            out["p_top"], out["p_top_ids"] = -np.ones((B, T, X), np.float32), np.zeros((B, T, X), np.int32)
        return out

    def dispatch_decode(self, step: DecodeStep, prev: FakeCall | None = None) -> FakeCall:
        B = step.table.shape[0]
        self._check_shapes(step, B)
        st_ = {k: v.copy() for k, v in (prev.state if step.state is None else step.state).items()}
        toks, emitted = np.zeros((step.steps, B), np.int32), np.zeros((step.steps, B), bool)
        for b, seq in enumerate(step.seqs):
            if st_["active"][b]:        # (a row that ended on the device stops counting)
                assert (int(st_["lens"][b]), int(st_["n"][b])) == (step.lens_start[b], step.n_start[b])
            for i in range(step.steps):
                if not st_["active"][b]:
                    continue
                lens, n = int(st_["lens"][b]), int(st_["n"][b])
                self._write(b, step, lens, int(st_["tok"][b]))
                self._history(b, step, lens + 1, seq.req)
                new = stream(int(st_["seed"][b]), n)
                toks[i, b], emitted[i, b] = new, True
                st_["lens"][b], st_["n"][b], st_["tok"][b] = lens + 1, n + 1, new
                stop = new in st_["stops"][b] or n + 1 >= st_["max_n"][b]
                st_["active"][b] = not stop
        out = {"token": toks, "emitted": emitted}
        if step.logprobs:
            out["logprob"] = -np.ones(toks.shape, np.float32)
            out["top"], out["top_ids"] = -np.ones(toks.shape + (X,), np.float32), np.repeat(toks[..., None], X, -1)
        return FakeCall(step, st_, out)

    def collect(self, call: FakeCall) -> dict:
        return call.out


# ----------------------------------------------------------------------------- the loop

def check_refs(s: Scheduler):
    check_pool(s.pool, [seq.pages for seq in s.running])
    assert all(seq.phase in (Phase.PREFILL, Phase.DECODE) for seq in s.running)
    assert len(s.running) <= s.max_slots


class Driver:
    """Engine._iteration over a FakeRunner, recording every output and checking as it goes."""

    def __init__(self, sched: Scheduler, arrivals=lambda: False):
        self.s, self.runner, self.arrivals = sched, FakeRunner(sched), arrivals
        self.tokens, self.done = {}, {}

    def take(self, out):
        for rid, tokens, lps in out.tokens:
            assert rid not in self.done and tokens
            self.tokens.setdefault(rid, []).extend(tokens)
            assert lps is None or [lp.token for lp in lps] == tokens
        for c in out.finished:
            assert c.request_id not in self.done
            self.done[c.request_id] = c

    def iteration(self):
        s, r = self.s, self.runner
        step = s.schedule_prefill()
        check_refs(s)
        if step is not None:
            self.take(s.update_from_output(step, r.prefill(step)))
            check_refs(s)
        before, preempted = list(s.running), s.counters["preemptions"]
        step = s.schedule_decode()
        gone = [seq for seq in before if seq not in s.running]
        assert gone == before[len(before) - len(gone):]                  # the most recent first
        assert list(s.waiting)[:len(gone)] == [seq.req for seq in gone]  # at the queue's head
        assert s.counters["preemptions"] - preempted == len(gone)
        check_refs(s)
        call = r.dispatch_decode(step) if step is not None else None
        while call is not None:
            nxt = s.chain_decode(call.step, self.arrivals())
            nxt = r.dispatch_decode(nxt, call) if nxt is not None else None
            self.take(s.update_from_output(call.step, r.collect(call)))
            check_refs(s)
            call = nxt

    def run(self, limit=10_000):
        for _ in range(limit):
            if not self.s.has_work():
                return
            self.iteration()
        raise AssertionError("no progress")


def make(max_slots=4, max_len=64, page_size=4, num_pages=None, prefix_cache=True, decode_steps=4,
         prefill_chunk=16, min_rows=1):
    num_pages = num_pages or max_slots * -(-max_len // page_size)
    return Scheduler(max_slots, max_len, page_size, num_pages, prefix_cache, decode_steps, prefill_chunk, min_rows)


def submit(s: Scheduler, rid: int, prompt, **sp):
    req = s.new_request(rid, list(prompt), SamplingParams(**sp), seed=sp.get("seed") or rid)
    assert s.pages_needed(len(prompt), req.sp.max_tokens) <= s.num_pages
    s.add(req)
    return req


def check_drained(s: Scheduler):
    assert not s.running and not s.waiting and not s.live
    assert s.pool.in_use == 0 and s.pool.used == s.pool.cached and not s.pool.pending
    assert all(r == 0 for r in s.pool.refs)
    check_pool(s.pool, [])


# ----------------------------------------------------------------------------- hand-worked cases

def test_scheduler_and_pages_import_no_jax():
    """scheduler.py and pages.py (and what they import) run with no JAX: loaded in a fresh
    process under stub `kvjax` packages (whose __init__ would import JAX), no jax/flax
    module may appear; and, read with `ast`, no module they reach imports jax or flax."""
    code = textwrap.dedent(f"""
        import json, sys, types
        for name, path in (("kvjax", {str(ROOT / "kvjax")!r}),
                           ("kvjax.engine", {str(ROOT / "kvjax" / "engine")!r})):
            m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m
        import importlib
        for mod in sys.argv[1:]:
            importlib.import_module(mod)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))))
    """)

    def heavy(*mods):
        proc = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    assert heavy("kvjax.engine.scheduler", "kvjax.engine.pages") == []
    assert "kvjax.engine.scheduler" not in imports_of("kvjax.engine.pages")
    for mod in ("kvjax.engine.scheduler", "kvjax.engine.pages"):
        assert not {m for m in reach(mod) for i in imports_of(m) if i.split(".")[0] in ("jax", "jaxlib", "flax")}
    # the checks can fail: programs.py imports JAX, directly and through kvjax.model
    assert "jax" in imports_of("kvjax.engine.programs") and "kvjax.model" in reach("kvjax.engine.programs")


def imports_of(mod: str) -> set:
    """Absolute names of the modules a kvjax module imports (ast; relative imports resolved)."""
    path = ROOT.joinpath(*mod.split(".")).with_suffix(".py")
    package = mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names
                    if ROOT.joinpath(*f"{name}.{a.name}".split(".")).with_suffix(".py").exists()}
    return out


def reach(mod: str) -> set:
    """mod and every kvjax module it imports, transitively (package __init__s not counted:
    the stub test above shows they are not needed)."""
    seen, todo = set(), [mod]
    while todo:
        m = todo.pop()
        if m in seen or not ROOT.joinpath(*m.split(".")).with_suffix(".py").exists():
            continue
        seen.add(m)
        todo += [i for i in imports_of(m) if i.startswith("kvjax.")]
    return seen


def test_admission_is_fifo_and_steps_have_bucketed_shapes():
    s = make(max_slots=2, page_size=4, prefill_chunk=8, min_rows=2)
    reqs = [submit(s, rid, range(1, n + 1), max_tokens=3) for rid, n in enumerate((10, 3, 5))]
    step = s.schedule_prefill()
    assert [seq.req.id for seq in step.seqs] == [0, 1] and [r.id for r in s.waiting] == [2]
    assert step.tokens.shape == (2, 16)                  # rows to a power of two, the chunk to MIN_CHUNK
    assert list(step.lengths) == [8, 3] and list(step.starts) == [0, 0]
    assert step.table.shape == (2, s.view(2)) and not step.logprobs and not step.prompt_logprobs
    assert all(seq.phase is Phase.PREFILL for seq in s.running)
    d = Driver(s)
    d.take(s.update_from_output(step, d.runner.prefill(step)))
    assert [seq.phase for seq in s.running] == [Phase.PREFILL, Phase.DECODE]   # 10 tokens: 2 chunks
    d.run()
    for req in reqs:
        assert d.done[req.id].tokens == expected(req) == d.tokens[req.id]
    check_drained(s)


def test_prefix_sharing_waits_for_the_pending_prefix_then_hits():
    """As the engine test: the first request computes a 32-token prefix; the others wait for
    its pages (pending) instead of computing them, then share them."""
    s = make(max_slots=4, max_len=96, page_size=8, prefill_chunk=32)
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(0, V, 32)]
    prompts = [system + [int(t) for t in rng.integers(0, V, n)] for n in (3, 9, 5, 14)]
    for rid, p in enumerate(prompts):
        submit(s, rid, p, max_tokens=10)
    d = Driver(s)
    d.run()
    assert [d.done[i].cached_tokens for i in range(4)] == [0, 32, 32, 32]
    assert s.counters["prefill_tokens_computed"] == sum(map(len, prompts)) - 3 * 32
    assert s.counters["prefix_hits"] == 12
    check_drained(s)
    # a prompt that is all cache still computes its last page (its logits need a real token)
    submit(s, 4, prompts[0], max_tokens=10)
    submit(s, 5, system, max_tokens=10)
    d.run()
    assert (d.done[4].cached_tokens, d.done[5].cached_tokens) == (32, 24)
    check_drained(s)


def test_preemption_recomputes_and_every_request_gets_its_own_stream():
    s = make(max_slots=8, max_len=96, page_size=8, num_pages=30, prefix_cache=False)
    rng = np.random.default_rng(4)
    reqs = [submit(s, rid, rng.integers(0, V, n), max_tokens=24)
            for rid, n in enumerate((30, 41, 25, 36, 44, 28, 33, 39))]
    d = Driver(s)
    d.run()
    assert s.counters["preemptions"] > 0 and s.pool.peak <= 30
    assert s.counters["prefill_tokens_computed"] > s.counters["prompt_tokens"]
    for req in reqs:
        assert d.done[req.id].tokens == expected(req) == d.tokens[req.id]
        assert d.done[req.id].finish_reason == "length"
    check_drained(s)
    assert s.pool.used == 0


def test_admission_keeps_a_page_per_decoding_request_in_reserve():
    """A request is not admitted into the last free pages while others decode (it would force
    a preemption at their next page); with nothing running it takes them."""
    s = make(max_slots=2, max_len=16, page_size=4, num_pages=4, prefix_cache=False)
    submit(s, 0, [1, 2, 3], max_tokens=12)               # 1 page now, up to 4 pages decoding
    d = Driver(s, arrivals=lambda: True)
    d.iteration()                                        # prefilled, decoding: 2 pages
    assert s.running[0].phase is Phase.DECODE and s.pool.available == 2
    submit(s, 1, [4, 5, 6, 7, 8, 9, 1, 2], max_tokens=1)  # needs 2 pages: 0 left for request 0
    s.schedule_prefill()
    assert [r.id for r in s.waiting] == [1] and len(s.running) == 1
    s.abort(0)
    assert s.schedule_prefill().seqs[0].req.id == 1


def test_requests_waiting_on_a_pending_prefix_keep_their_place():
    """Requests that wait for a prefix being computed stay at the head of the queue, in
    order, while an unrelated one behind them takes the free place."""
    s = make(max_slots=2, page_size=4, prefill_chunk=4)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    submit(s, 0, prefix + [9], max_tokens=2)
    submit(s, 1, prefix + [10], max_tokens=2)
    submit(s, 2, prefix + [11], max_tokens=2)
    submit(s, 3, [5, 5, 5], max_tokens=2)
    submit(s, 4, [6, 6, 6], max_tokens=2)
    step = s.schedule_prefill()
    assert [seq.req.id for seq in step.seqs] == [0, 3] and [r.id for r in s.waiting] == [1, 2, 4]
    Driver(s).run()
    check_drained(s)


def test_the_host_cuts_at_a_stop_token_and_max_tokens_whatever_the_device_emits():
    s = make(max_slots=2, page_size=4, decode_steps=4)
    a = submit(s, 0, [1, 2, 3], max_tokens=30, stop_token_ids=(7,))
    b = submit(s, 1, [4, 5], max_tokens=3)
    d = Driver(s)
    step = s.schedule_prefill()
    d.take(s.update_from_output(step, {"token": np.array([1, 2], np.int32)}))
    step = s.schedule_decode()
    tokens = np.array([[2, 2], [7, 2], [3, 2], [7, 2]], np.int32)          # [steps, B]
    out = s.update_from_output(step, {"token": tokens, "emitted": np.ones((4, 2), bool)})
    d.take(out)
    assert (d.done[0].tokens, d.done[0].finish_reason) == ([1, 2, 7], "stop")
    assert (d.done[1].tokens, d.done[1].finish_reason) == ([2, 2, 2], "length")
    assert a.generated == [1, 2, 7] and b.generated == [2, 2, 2]
    check_drained(s)


def test_stop_tokens_logprobs_and_prompt_logprobs():
    s = make(prefill_chunk=8)
    probe = s.new_request(0, [1], SamplingParams(), seed=7)
    stop = stream(7, 5)
    reqs = [submit(s, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], max_tokens=20, seed=7, stop_token_ids=(stop,),
                   logprobs=2, prompt_logprobs=1),
            submit(s, 1, [3, 1, 2], max_tokens=6, logprobs=0)]
    d = Driver(s)
    d.run()
    a, b = d.done[0], d.done[1]
    assert probe.seed == 7 and a.finish_reason == "stop" and a.tokens == expected(reqs[0])
    assert a.tokens[-1] == stop and len(a.tokens) <= 6
    assert [lp.token for lp in a.logprobs] == a.tokens and [lp.token for lp in b.logprobs] == b.tokens
    assert a.prompt_logprobs[0] is None and [lp.token for lp in a.prompt_logprobs[1:]] == reqs[0].prompt[1:]
    assert b.prompt_logprobs is None and (b.finish_reason, len(b.tokens)) == ("length", 6)
    check_drained(s)


def test_decode_calls_chain_until_a_row_may_end():
    s = make(max_slots=2, page_size=4, decode_steps=4)
    submit(s, 0, [1, 2, 3], max_tokens=30)
    d = Driver(s)
    step = s.schedule_prefill()
    d.take(s.update_from_output(step, d.runner.prefill(step)))
    first = s.schedule_decode()
    assert first.state is not None and first.lens_start == (3,) and first.n_start == (1,)
    nxt = s.chain_decode(first)
    assert nxt.state is None and (nxt.lens_start, nxt.n_start) == ((7,), (5,))
    assert len(s.running[0].pages) * 4 >= 7 + 4                   # the chained call's pages taken
    assert s.chain_decode(first, arrivals=True) is None           # something arrived: back to the host
    submit(s, 1, [5, 6], max_tokens=30, stop_token_ids=(3,))
    assert s.chain_decode(first) is None                          # a place is free and a request waits


def test_abort_waiting_running_and_unknown():
    s = make(max_slots=1)
    submit(s, 0, [1, 2, 3, 4, 5], max_tokens=30)
    submit(s, 1, [6, 7], max_tokens=30)
    d = Driver(s, arrivals=lambda: True)          # no chaining: one decode call per iteration
    d.iteration()
    assert [seq.req.id for seq in s.running] == [0] and [r.id for r in s.waiting] == [1]
    out = s.abort(1)
    assert [c.request_id for c in out.finished] == [1] and out.finished[0].tokens == []
    out = s.abort(0)
    assert out.finished[0].finish_reason == "abort" and out.finished[0].tokens == d.tokens[0]
    assert s.abort(0).finished == [] and s.abort(99).finished == []
    assert s.counters["aborted"] == 2 and s.counters["finished"] == 2
    check_drained(s)
    # everything at once (Engine.close(drain=False)): one completion per live request
    for rid in (2, 3, 4):
        submit(s, rid, [1, 2, 3, 4, 5, 6], max_tokens=30)
    d.iteration()
    out = s.abort_all()
    assert sorted(c.request_id for c in out.finished) == [2, 3, 4]
    assert {c.finish_reason for c in out.finished} == {"abort"} and s.abort_all().finished == []
    check_drained(s)


# ----------------------------------------------------------------------------- property

@st.composite
def workloads(draw):
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_len = draw(st.integers(4, 40))
    max_slots = draw(st.integers(1, 4))
    cfg = dict(max_slots=max_slots, max_len=max_len, page_size=page_size, prefix_cache=draw(st.booleans()),
               decode_steps=draw(st.integers(1, 5)), prefill_chunk=draw(st.sampled_from([1, 3, 8, 16, 40])),
               min_rows=draw(st.sampled_from([1, 1, 2])))
    per_seq = -(-max_len // page_size)
    tight = st.integers(per_seq, per_seq + max_slots)          # preemptions are likely
    cfg["num_pages"] = draw(st.one_of(tight, st.integers(per_seq, max_slots * per_seq + 2)))
    bases = [draw(st.lists(st.integers(0, 2), min_size=1, max_size=max_len - 1)) for _ in range(2)]
    reqs = []
    for _ in range(draw(st.integers(1, 8))):
        base = bases[draw(st.integers(0, 1))]
        tail = draw(st.lists(st.integers(0, V - 1), max_size=4))
        prompt = (base[:draw(st.integers(0, len(base)))] + tail)[:max_len - 1] or [0]
        reqs.append(dict(prompt=prompt, max_tokens=draw(st.integers(1, max_len)), seed=draw(st.integers(0, 2)),
                         stops=draw(st.one_of(st.just([]), st.lists(st.integers(0, V - 1), max_size=2))),
                         logprobs=draw(st.sampled_from([None, 1])), plp=draw(st.sampled_from([None, None, 0])),
                         arrive=draw(st.integers(0, 4)), cancel=draw(st.sampled_from([None, None, 0, 1, 3, 6]))))
    return cfg, reqs, draw(st.integers(0, 2**16))


@settings(derandomize=True, max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_give_each_request_its_stream_and_leak_no_page(work):
    cfg, specs, chain_seed = work
    s = Scheduler(**cfg)
    coin = random.Random(chain_seed)
    d = Driver(s, arrivals=lambda: coin.random() < 0.3)
    reqs, it = {}, 0
    while it < 2000 and (s.has_work() or any(r["arrive"] >= it for r in specs)):
        for rid, r in enumerate(specs):
            if r["arrive"] == it:
                reqs[rid] = submit(s, rid, r["prompt"], max_tokens=r["max_tokens"], seed=r["seed"] + 1,
                                   stop_token_ids=tuple(r["stops"]), logprobs=r["logprobs"],
                                   prompt_logprobs=r["plp"])
            if r["cancel"] is not None and r["arrive"] + r["cancel"] == it:
                d.take(s.abort(rid))
        d.iteration()
        it += 1
    assert it < 2000, "no progress"
    check_drained(s)
    assert sorted(d.done) == sorted(reqs)
    for rid, req in reqs.items():
        c, want = d.done[rid], expected(req)
        assert c.tokens == d.tokens.get(rid, [])
        if c.finish_reason == "abort":
            assert c.tokens == want[:len(c.tokens)]
        else:
            assert (c.tokens, c.finish_reason) == (want, "stop" if want[-1] in req.stops else "length")
        assert c.cached_tokens % s.page_size == 0 and c.cached_tokens < len(req.prompt)
        if req.sp.logprobs is not None:
            assert [lp.token for lp in c.logprobs] == c.tokens
        if req.sp.prompt_logprobs is not None and c.finish_reason != "abort":
            assert len(c.prompt_logprobs) == len(req.prompt)
    assert s.counters["finished"] == len(reqs)
    assert s.counters["generated_tokens"] == sum(len(c.tokens) for c in d.done.values())
