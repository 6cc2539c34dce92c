"""The engine's scheduler: which requests run, which pages they hold, what each device call
computes. Host only (NumPy, no JAX): tests drive it with made-up requests and fake sampled
tokens, in milliseconds.

Axis letters of a step's arrays: B rows of the call (requests, bucketed to powers of two),
T prefill chunk width, W pages per row (the attention view), E stop ids per row; Z is
page_size (tokens per page).

The seam is vLLM v1's: the scheduler decides, the runner (runner.py) executes, and the
sampled tokens come back. One iteration of `Engine`'s loop:

    step = scheduler.schedule_prefill()        # admission, then a chunk per prefilling request
    out = runner.prefill(step)                 # sampled tokens (NumPy)
    scheduler.update_from_output(step, out)    # tokens appended, requests finished, pages freed
    step = scheduler.schedule_decode()         # pages for `decode_steps` steps (preempting)
    call = runner.dispatch_decode(step)        # asynchronous
    nxt = scheduler.chain_decode(step, ...)    # the next call, continued on the device, or None
    scheduler.update_from_output(step, runner.collect(call))

A request whose prompt ends in this iteration's prefill decodes in the same iteration.

Admission: FIFO, while places (max_slots) and pages last; the prefix cache lends what it
already holds of the prompt, and a page per decoding request is kept in reserve so that
admitting does not force a preemption. A request whose prefix is being computed by a
running request (pending pages, see pages.py) waits for it and lets the ones behind go
first: computing the same prefix twice is what the cache avoids.

Preemption: when decoding needs a page and the pool has none free (nor any cached page to
evict), the most recently admitted request is preempted: its full pages go to the prefix
cache, the rest are freed, and it waits at the head of the queue to be prefilled again from
its prompt plus what it already generated (recompute, as vLLM does by default).
"""
from __future__ import annotations

import dataclasses

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..buckets import pow2
from ..sampling_params import DEFAULTS, host_controls, is_default, token_counts
from .api import Completion, SamplingParams, TokenLogprob
from .pages import PagePool

MIN_CHUNK = 16          # narrowest prefill chunk compiled
MIN_VIEW_TOKENS = 128   # narrowest attention view (in tokens) compiled, as kvjax.decode's MIN_LIVE


def chunk_bucket(n: int) -> int:
    """Prefill chunk width for n tokens: powers of two up to 2 * MIN_CHUNK, then multiples of
    2 * MIN_CHUNK (16, 32, 64, 96, 128, ...): at most a third of a wide chunk is padding, and
    a prefill_chunk of 128 compiles five widths."""
    step = 2 * MIN_CHUNK
    return pow2(n, floor=MIN_CHUNK) if n <= step else -(-n // step) * step


def token_logprob(logprob, top, ids, k: int, token: int) -> TokenLogprob:
    """A position's TokenLogprob from a program's outputs: the chosen token's log-probability
    and the first k of the top alternatives (top [X] log-probs, ids [X], most likely first)."""
    return TokenLogprob(int(token), float(logprob), {int(i): float(v) for i, v in zip(ids[:k], top[:k])})


class Phase(enum.Enum):
    PREFILL = "prefill"   # writing its prompt (and, after a preemption, what it generated)
    DECODE = "decode"     # generating: one token per decode step


@dataclass(eq=False)
class Request:
    """One request, from submission to completion (it outlives its Seqs across preemptions)."""
    id: int
    prompt: list
    sp: SamplingParams
    max_n: int                       # tokens it may generate (max_tokens, capped by max_len)
    seed: int                        # uint32: its random stream
    stops: frozenset
    generated: list = field(default_factory=list)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cached_tokens: int | None = None   # set at first admission
    admitted_before: bool = False
    prompt_logprobs_done: bool = False
    controlled: bool = False           # uses logit controls (penalties, bias, min_p, min_tokens)
    matcher: object = None             # structured output: its grammar state (kvjax/structured)

    @property
    def plain_only(self) -> bool:
        """Whether its decode calls must not speculate (logit controls or a grammar)."""
        return self.controlled or self.matcher is not None


@dataclass(eq=False)
class Seq:
    """A running request: its pages and how far its tokens are written."""
    req: Request
    pages: list
    target: int          # tokens to write before decoding (prompt + generated at admission)
    lens: int            # tokens written
    node: int            # prefix-cache node of the last registered/hit page
    registered: int      # full pages registered (pending or written) or hit
    marked: int          # of those, pages marked written
    phase: Phase = Phase.PREFILL
    tok: int = -1        # decode: the last sampled token, not yet written
    want_prompt_lp: bool = False
    spec_rate: float = 1.0   # speculation: running acceptance rate (engine/speculative.py)
    spec_off: int = 0        # speculation: iterations left without proposals


@dataclass(frozen=True, eq=False)
class PrefillStep:
    """One prefill-chunk call: row b appends tokens[b, :lengths[b]] after starts[b] tokens and
    samples token index[b] of its request (kept only where the chunk ends the prompt). Rows
    from len(seqs) on are idle (length 0)."""
    seqs: tuple              # the rows' Seqs (the scheduler's own; the runner never reads them)
    tokens: np.ndarray       # int32 [B, T], right-padded
    targets: np.ndarray      # int32 [B, T]: the prompt token after each position (prompt logprobs)
    lengths: np.ndarray      # int32 [B]: tokens of this chunk
    starts: np.ndarray       # int32 [B]: tokens the row already holds
    index: np.ndarray        # int32 [B]: the sampled token's index in its request
    table: np.ndarray        # int32 [B, W]: page table (num_pages where a row has no page)
    sampling: dict           # temperature float32, top_k int32, top_p float32, seed uint32 [B]
    logprobs: bool           # some row ending its prompt asks for logprobs
    prompt_logprobs: bool    # some row asks for prompt logprobs


@dataclass(frozen=True, eq=False)
class DecodeStep:
    """One call of `steps` decode steps. `state` (a fresh call): tok, lens, n, max_n int32 [B],
    active bool [B], stops int32 [B, E] (-1 padded) and the sampling arrays [B]; None: the
    call continues on the device from the call before it (chained, see `chain_decode`)."""
    seqs: tuple
    table: np.ndarray        # int32 [B, W]
    state: dict | None
    steps: int
    logprobs: bool
    stop_width: int          # E
    lens_start: tuple        # per row: tokens written when this call starts
    n_start: tuple           # per row: tokens generated when this call starts


@dataclass
class Outputs:
    """What an update produced: (request id, new token ids, their TokenLogprobs or None) per
    request that got tokens, and the Completion of every request that ended (after its
    tokens)."""
    tokens: list = field(default_factory=list)
    finished: list = field(default_factory=list)


COUNTERS = ("prompt_tokens", "prefill_tokens_computed", "generated_tokens", "preemptions",
            "prefix_hits", "cached_tokens", "finished", "aborted", "failed",
            "spec_proposed", "spec_accepted", "spec_forwards")


class Scheduler:
    """Requests, their pages and the batches of each call (see the module docstring).

    min_rows: the narrowest batch (a mesh's data axis: rows are split over it).
    speculate: tokens proposed per speculative iteration (0: no speculation). A speculative
    decode call advances a row by 1 to speculate + 1 tokens per step, so the host takes pages
    for that lookahead when the pool has them (free or evictable; only the plain need ever
    preempts), sends each
    row's history and page capacity, and never chains calls (it cannot know the lengths).
    verify_budget: the most tokens a speculative call's verify forward may hold (rows x
    (speculate + 1)); a wider call decodes plainly (and may chain). None: no limit."""

    def __init__(self, max_slots: int, max_len: int, page_size: int, num_pages: int,
                 prefix_cache: bool = True, decode_steps: int = 8, prefill_chunk: int = 128,
                 min_rows: int = 1, speculate: int = 0, verify_budget: int | None = None, vocab_size: int = 0):
        self.max_slots, self.max_len, self.page_size, self.num_pages = max_slots, max_len, page_size, num_pages
        self.vocab_size = vocab_size          # the dense arrays of logit controls (kvjax/controls.py)
        self.speculate, self.verify_budget = speculate, verify_budget
        self.decode_steps, self.prefill_chunk, self.min_rows = decode_steps, prefill_chunk, min_rows
        self.pages_per_seq = -(-max_len // page_size)
        self.pool = PagePool(num_pages, page_size, prefix_cache)
        self.waiting: deque = deque()     # Requests, in admission order
        self.running: list = []           # Seqs, oldest admitted first
        self.live: dict = {}              # request id -> Request not finished
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._out = Outputs()

    # ------------------------------------------------------------------ requests
    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages a request needs at its longest (its last token is never written)."""
        max_n = min(int(max_tokens), self.max_len - prompt_len)
        return -(-(prompt_len + max_n - 1) // self.page_size)

    def new_request(self, rid: int, prompt: list, sp: SamplingParams, seed: int) -> Request:
        max_n = min(int(sp.max_tokens), self.max_len - len(prompt))
        return Request(rid, prompt, sp, max_n, seed % 2**32, frozenset(sp.stop_token_ids),
                       logprobs=[] if sp.logprobs is not None else None,
                       controlled=not is_default(**{name: getattr(sp, name) for name in DEFAULTS}),
                       matcher=sp.guide.matcher() if sp.guide is not None else None)

    def add(self, req: Request):
        """Queue a request (checked by the caller: it fits the pool and max_len)."""
        self.live[req.id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: int) -> Outputs:
        """End a request now (finish_reason "abort"), freeing its pages; unknown ids are ignored."""
        self._abort(rid)
        return self._take()

    def abort_all(self) -> Outputs:
        for rid in list(self.live):
            self._abort(rid)
        return self._take()

    def _abort(self, rid: int):
        req = self._drop(rid)
        if req is not None:
            self.counters["aborted"] += 1
            self._complete(req, "abort")

    def _drop(self, rid: int):
        """Take a live request out of the queue or its slot (pages freed); None if unknown."""
        req = self.live.get(rid)
        if req is None:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        for s in self.running:
            if s.req is req:
                self._release(s)
                break
        return req

    def requeue_running(self, pages_lost: bool) -> list:
        """After a failed call: every running request back to the front of the queue, to be
        recomputed from its prompt and the tokens it has (as preemption does); returns their
        ids. pages_lost (the call took the pools with it): a fresh page pool, so no prefix-cache
        entry points at lost data; otherwise their written pages stay in the prefix cache."""
        ids = [s.req.id for s in self.running]
        if pages_lost:
            for s in reversed(self.running):
                self.waiting.appendleft(s.req)
            self.running.clear()
            self.pool = PagePool(self.num_pages, self.page_size, self.pool.prefix_cache)
        else:
            for s in reversed(list(self.running)):
                self._release(s)
                self.waiting.appendleft(s.req)
        return ids

    def fail(self, rid: int):
        """Drop a request that failed (its pages freed, no Completion: the caller reports the error)."""
        if self._drop(rid) is not None:
            self.live.pop(rid)
            self.counters["failed"] += 1

    def reset(self):
        """Forget every request and page (after a failed call: the pools' contents are lost)."""
        self.live.clear()
        self.waiting.clear()
        self.running.clear()
        self.pool = PagePool(self.num_pages, self.page_size, self.pool.prefix_cache)
        self._out = Outputs()

    # ------------------------------------------------------------------ shapes
    def rows(self, n: int) -> int:
        return pow2(n, floor=self.min_rows)

    def speculating(self, n: int) -> bool:
        """Whether a decode call of n rows speculates (within the verify budget)."""
        return bool(self.speculate) and (self.verify_budget is None
                                         or self.rows(n) * (self.speculate + 1) <= self.verify_budget)

    def view(self, pages: int) -> int:
        """Page-table width (attention view) for rows reaching `pages` pages: 2^k or 1.5 x 2^k
        pages (at least MIN_VIEW_TOKENS). The reference path copies the view out of the pool,
        so its width is paid every step; the half steps keep the padding under a third."""
        w = max(pages, max(1, MIN_VIEW_TOKENS // self.page_size))
        p2 = pow2(w)
        w = 3 * p2 // 4 if p2 >= 4 and 3 * p2 // 4 >= w else p2
        return min(w, self.pages_per_seq)

    def _table(self, seqs, B: int, W: int) -> np.ndarray:
        table = np.full((B, W), self.num_pages, np.int32)
        for b, s in enumerate(seqs):
            table[b, :min(len(s.pages), W)] = s.pages[:W]
        return table

    def _sampling(self, seqs, B: int) -> dict:
        temp, top_k, top_p, seed = (np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32),
                                    np.zeros(B, np.uint32))
        for b, s in enumerate(seqs):
            sp = s.req.sp
            temp[b], top_k[b], top_p[b], seed[b] = sp.temperature, sp.top_k, sp.top_p, s.req.seed
        out = dict(temperature=temp, top_k=top_k, top_p=top_p, seed=seed)
        if any(s.req.controlled for s in seqs):
            out.update(self._controls(seqs, B))
        guided = [s.req.matcher for s in seqs if s.req.matcher is not None]
        if guided:                                   # the grammar's allowed tokens, packed
            out["grammar"] = np.full((B, guided[0].info.mask_words), -1, np.int32)   # all ones: free
            for b, s in enumerate(seqs):
                if s.req.matcher is not None:
                    s.req.matcher.bitmask(out=out["grammar"][b])
        return out

    def _controls(self, seqs, B: int) -> dict:
        """The logit controls' arrays of a call with a controlled row (kvjax/controls.py): per-row
        settings (defaults on other and idle rows), dense bias and prompt sets [B, V], the
        tokens each row generated so far [B, V] and its stop ids [B, E]."""
        pad = B - len(seqs)
        per_row = lambda name: [getattr(s.req.sp, name) for s in seqs] + [DEFAULTS[name]] * pad  # noqa: E731
        arrays = host_controls(self.vocab_size, B, [s.req.prompt for s in seqs],
                               **{name: per_row(name) for name in DEFAULTS})
        arrays["counts"] = token_counts([s.req.generated for s in seqs] + [[]] * pad, self.vocab_size)
        return dict(arrays, stops=self._stops(seqs, B))

    @staticmethod
    def _stops(seqs, B: int) -> np.ndarray:
        """The rows' stop ids, int32 [B, E] (-1 padded; E a power of two, at least 4)."""
        stops = np.full((B, pow2(max((len(s.req.stops) for s in seqs), default=0), floor=4)), -1, np.int32)
        for b, s in enumerate(seqs):
            stops[b, :len(s.req.stops)] = sorted(s.req.stops)
        return stops

    # ------------------------------------------------------------------ prefill
    def schedule_prefill(self) -> PrefillStep | None:
        """Admit what fits, then one chunk for every request still prefilling (None: none is)."""
        self._admit()
        seqs = [s for s in self.running if s.phase is Phase.PREFILL]
        return self._prefill_step(seqs[:self.max_slots]) if seqs else None

    def _admit(self):
        Z, pool = self.page_size, self.pool
        deferred = []
        while self.waiting and len(self.running) < self.max_slots:
            req = self.waiting.popleft()
            toks = req.prompt + req.generated
            L = len(toks)
            want_plp = req.sp.prompt_logprobs is not None and not req.prompt_logprobs_done
            if want_plp:
                req.prompt_logprobs = None      # (re)computed from the start by this prefill
            hits, node, pending = ([], 0, False) if want_plp else pool.lookup(toks, (L - 1) // Z)
            if pending:
                pool.release(hits)
                deferred.append(req)
                continue
            reserve = sum(1 for s in self.running if s.phase is Phase.DECODE)
            need = -(-L // Z) - len(hits)
            rest = pool.alloc(need) if pool.available - need >= reserve or not self.running else None
            if rest is None:
                pool.release(hits)
                self.waiting.appendleft(req)
                break
            self._start(req, hits + rest, L, node, len(hits), want_plp)
        self.waiting.extendleft(reversed(deferred))

    def _start(self, req: Request, pages: list, L: int, node: int, hits: int, want_plp: bool):
        cached = hits * self.page_size
        if not req.admitted_before:
            req.admitted_before, req.cached_tokens = True, cached
            self.counters["prompt_tokens"] += len(req.prompt)
        self.counters["prefix_hits"] += hits
        self.counters["cached_tokens"] += cached
        s = Seq(req, pages, L, cached, node, hits, hits, want_prompt_lp=want_plp)
        self.running.append(s)
        self._register(s)              # its prompt's full pages, pending until written

    def _prefill_step(self, seqs, shape: tuple | None = None) -> PrefillStep:
        """The prefill call of `seqs`; shape (B, T, W): those widths instead of the rows' own
        (an idle call of that shape when seqs is empty: `idle_steps`)."""
        n = [min(self.prefill_chunk, s.target - s.lens) for s in seqs]
        if shape is None:
            B = self.rows(len(seqs))
            T = min(chunk_bucket(max(n)), max(self.prefill_chunk, MIN_CHUNK))
            W = self.view(max(-(-(s.lens + k) // self.page_size) for s, k in zip(seqs, n)))
        else:
            B, T, W = shape
        tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        lengths, starts, index = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        want_lp = want_plp = False
        for b, (s, k) in enumerate(zip(seqs, n)):
            toks = s.req.prompt + s.req.generated
            tokens[b, :k] = toks[s.lens:s.lens + k]
            nxt = toks[s.lens + 1:s.lens + k + 1]
            targets[b, :len(nxt)] = nxt
            lengths[b], starts[b], index[b] = k, s.lens, len(s.req.generated)
            want_lp |= s.lens + k == s.target and s.req.sp.logprobs is not None
            want_plp |= s.want_prompt_lp
        return PrefillStep(tuple(seqs), tokens, targets, lengths, starts, index, self._table(seqs, B, W),
                           self._sampling(seqs, B), want_lp, want_plp)

    def _update_prefill(self, step: PrefillStep, out: dict):
        for b, (s, k) in enumerate(zip(step.seqs, step.lengths.tolist())):
            req = s.req
            if s.want_prompt_lp:
                if s.lens == 0:
                    req.prompt_logprobs = [None]
                for t in range(k):
                    if s.lens + t + 1 < len(req.prompt):
                        req.prompt_logprobs.append(token_logprob(
                            out["p_logprob"][b, t], out["p_top"][b, t], out["p_top_ids"][b, t],
                            req.sp.prompt_logprobs, step.targets[b, t]))
            s.lens += k
            self.counters["prefill_tokens_computed"] += k
            self._register(s)
            if s.lens == s.target:
                req.prompt_logprobs_done |= s.want_prompt_lp
                s.want_prompt_lp = False
                tok = int(out["token"][b])
                lps = ([token_logprob(out["logprob"][b], out["top"][b], out["top_ids"][b], req.sp.logprobs, tok)]
                       if req.sp.logprobs is not None else None)
                if not self._append(s, [tok], lps):
                    s.phase, s.tok = Phase.DECODE, tok

    def idle_steps(self, logprobs=(False, True), prompt_logprobs=(False,)):
        """One idle call (no row writes anything) of every shape a prefill or decode call can
        take: rows in the batch buckets up to max_slots, chunk widths up to prefill_chunk,
        attention views up to max_len, the given logprob flags (a decode call with stop lists
        of up to 4 ids, the usual case: more ids widen its stop table). Running them compiles
        every program the engine will use (Engine.warm_up)."""
        rows = sorted({self.rows(n) for n in range(1, self.max_slots + 1)})
        chunks = sorted({min(chunk_bucket(n), max(self.prefill_chunk, MIN_CHUNK))
                         for n in range(1, self.prefill_chunk + 1)})
        views = sorted({self.view(p) for p in range(1, self.pages_per_seq + 1)})
        for B in rows:
            for T in chunks:
                for W in views:
                    for lp in logprobs:
                        for plp in prompt_logprobs:
                            yield dataclasses.replace(self._prefill_step((), (B, T, W)), logprobs=lp,
                                                      prompt_logprobs=plp)
            for W in views:
                for lp in logprobs:
                    yield dataclasses.replace(self._decode_step((), (B, W)), logprobs=lp)

    # ------------------------------------------------------------------ decode
    def schedule_decode(self) -> DecodeStep | None:
        """Give every decoding request the pages its next `decode_steps` steps can reach
        (preempting the most recently admitted when the pool is dry); the call's rows, or
        None when no request decodes."""
        if not any(s.phase is Phase.DECODE for s in self.running):
            return None
        Z, k = self.page_size, self.decode_steps
        spec = self.speculating(sum(s.phase is Phase.DECODE for s in self.running))
        for s in [s for s in self.running if s.phase is Phase.DECODE]:   # oldest first
            if s not in self.running:
                continue                                             # preempted for an older one
            left = s.req.max_n - len(s.req.generated)
            need = -(-(s.lens + min(k, left)) // Z) - len(s.pages)
            while need > 0:
                got = self.pool.alloc(need)
                if got is not None:
                    s.pages += got
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is s:
                    break
            if spec and s in self.running:             # lookahead pages, when the pool has them: never
                extra = min(-(-(s.lens + min(k * (self.speculate + 1), left)) // Z) - len(s.pages),
                            self.pool.available)        # preempts (cached prefixes go first, as for any page)
                if extra > 0:
                    s.pages += self.pool.alloc(extra)
        seqs = [s for s in self.running if s.phase is Phase.DECODE]
        return self._decode_step(seqs) if seqs else None

    def _decode_step(self, seqs, shape: tuple | None = None) -> DecodeStep:
        """The decode call of `seqs`; shape (B, W): those widths (an idle call when seqs is empty)."""
        B, W = shape if shape is not None else (self.rows(len(seqs)), self.view(max(len(s.pages) for s in seqs)))
        state = self._sampling(seqs, B)                # with controls, it holds the stops already
        state.update(tok=np.zeros(B, np.int32), lens=np.zeros(B, np.int32), n=np.zeros(B, np.int32),
                     active=np.zeros(B, bool), max_n=np.zeros(B, np.int32))
        if "stops" not in state:
            state["stops"] = self._stops(seqs, B)
        stop_w = state["stops"].shape[1]
        want_lp = False
        for b, s in enumerate(seqs):
            state["tok"][b], state["lens"][b], state["n"][b] = s.tok, s.lens, len(s.req.generated)
            state["active"][b], state["max_n"][b] = True, s.req.max_n
            want_lp |= s.req.sp.logprobs is not None
        table = self._table(seqs, B, W)
        # the runner runs the speculative program on "hist" (rows with logit controls or a
        # grammar decode plainly)
        if self.speculating(B) and not any(s.req.plain_only for s in seqs):
            H = table.shape[1] * self.page_size
            state.update(hist=np.zeros((B, H), np.int32), cap=np.zeros(B, np.int32),
                         rate=np.ones(B, np.float32), off=np.zeros(B, np.int32))
            for b, s in enumerate(seqs):
                toks = s.req.prompt + s.req.generated          # pending (s.tok) last
                state["hist"][b, :len(toks)] = toks
                state["cap"][b] = len(s.pages) * self.page_size
                state["rate"][b], state["off"][b] = s.spec_rate, s.spec_off
        steps = 1 if "grammar" in state else self.decode_steps     # a grammar's mask changes every token
        return DecodeStep(tuple(seqs), table, state, steps, want_lp, stop_w,
                          tuple(s.lens for s in seqs), tuple(len(s.req.generated) for s in seqs))

    def chain_decode(self, step: DecodeStep, arrivals: bool = False) -> DecodeStep | None:
        """The call that continues `step` on the device before its tokens are read, or None
        (go back to the host first). Chained only while no row can finish inside `step`
        (none has a stop token or reaches max_tokens in it), nothing has arrived (`arrivals`:
        a submission, a cancel, a close) and no request waits for a free place: the host's
        bookkeeping then overlaps the device's work. Takes the chained call's pages."""
        if (step.state is not None and ("hist" in step.state or "grammar" in step.state)) \
                or not self._can_chain(step, arrivals):
            return None
        k, seqs = step.steps, step.seqs
        table = self._table(seqs, self.rows(len(seqs)), self.view(max(len(s.pages) for s in seqs)))
        return DecodeStep(seqs, table, None, k, step.logprobs, step.stop_width,
                          tuple(x + k for x in step.lens_start), tuple(x + k for x in step.n_start))

    def _can_chain(self, step: DecodeStep, arrivals: bool) -> bool:
        k = step.steps
        if len(step.seqs) != len(self.running) or any(s not in self.running for s in step.seqs) \
                or any(s.phase is not Phase.DECODE for s in self.running):
            return False
        if arrivals or (self.waiting and len(self.running) < self.max_slots):
            return False
        # rows that may end inside the call in flight (a stop token, or max_tokens reached):
        # with requests waiting for their places, or when the rows left would fit a narrower
        # (cheaper) program, go back to the host instead
        sure = sum(1 for s, n in zip(step.seqs, step.n_start) if not s.req.stops and n + k < s.req.max_n)
        if sure < len(step.seqs) and (self.waiting or self.rows(sure) != self.rows(len(step.seqs))):
            return False
        if sure == 0:
            return False
        # pages for the chained call: its rows start k tokens further on
        Z = self.page_size
        for s, lens, n in zip(step.seqs, step.lens_start, step.n_start):
            need = -(-(lens + k + max(min(k, s.req.max_n - n - k), 0)) // Z) - len(s.pages)
            if need > 0:
                got = self.pool.alloc(need)
                if got is None:
                    return False
                s.pages += got
        return True

    def _update_decode(self, step: DecodeStep, out: dict):
        toks, counts, want_lp = out["token"], out["emitted"].sum(axis=0).tolist(), "logprob" in out
        if "proposed" in out:               # a speculative call: its counts and adaptive state
            for name in ("proposed", "accepted", "forwards"):
                self.counters["spec_" + name] += int(out[name][:len(step.seqs)].sum())
            for b, s in enumerate(step.seqs):
                s.spec_rate, s.spec_off = float(out["rate"][b]), int(out["off"][b])
        for b, s in enumerate(step.seqs):
            if not counts[b] or s not in self.running:
                continue                       # nothing new, or finished (or aborted) meanwhile
            req = s.req
            new = toks[:counts[b], b].tolist()   # a row emits until it stops: a prefix of the steps
            new = new[:req.max_n - len(req.generated)]
            if req.stops:                        # cut after the first stop token
                stop = next((i for i, t in enumerate(new) if t in req.stops), None)
                new = new if stop is None else new[:stop + 1]
            lps = ([token_logprob(out["logprob"][i, b], out["top"][i, b], out["top_ids"][i, b],
                                  req.sp.logprobs, t) for i, t in enumerate(new)]
                   if want_lp and req.sp.logprobs is not None else None)
            s.lens += len(new)                 # each token fed at these steps is now written
            if not self._append(s, new, lps):
                s.tok = new[-1]

    # ------------------------------------------------------------------ outputs
    def update_from_output(self, step: PrefillStep | DecodeStep, out: dict) -> Outputs:
        """Close the loop on a call: append its sampled tokens to their requests, finish the
        requests they end (a stop token, max_tokens) and free their pages.

        out (NumPy): prefill: token [B] (+ logprob [B], top / top_ids [B, X] when
        step.logprobs; p_logprob [B, T], p_top / p_top_ids [B, T, X] when step.prompt_logprobs);
        decode: token, emitted [steps, B] (+ logprob [steps, B], top / top_ids [steps, B, X])."""
        if isinstance(step, PrefillStep):
            self._update_prefill(step, out)
        else:
            self._update_decode(step, out)
        return self._take()

    def _take(self) -> Outputs:
        out, self._out = self._out, Outputs()
        return out

    def _append(self, s: Seq, tokens: list, lps: list | None) -> bool:
        """Record generated tokens (only the last may end the request); True when the request
        is then finished (a stop token, or max_tokens reached), its pages freed."""
        req = s.req
        req.generated += tokens
        if lps is not None and req.logprobs is not None:
            req.logprobs += lps
        self.counters["generated_tokens"] += len(tokens)
        self._out.tokens.append((req.id, tokens, lps))
        last = tokens[-1]
        for t in tokens if req.matcher is not None else ():
            req.matcher.advance(t)          # masked on the device: a rejection is a bug (the request fails)
        complete = req.matcher is not None and req.matcher.finished()   # only EOS could follow
        reason = "stop" if last in req.stops or complete else "length" if len(req.generated) >= req.max_n else None
        if reason is not None:
            self._release(s)
            self._complete(req, reason)
            return True
        return False

    def _complete(self, req: Request, reason: str):
        self.live.pop(req.id, None)
        self.counters["finished"] += 1
        self._out.finished.append(Completion(
            tokens=list(req.generated), finish_reason=reason, prompt_tokens=len(req.prompt),
            cached_tokens=req.cached_tokens or 0, logprobs=req.logprobs,
            prompt_logprobs=req.prompt_logprobs, request_id=req.id))

    # ------------------------------------------------------------------ pages
    def _register(self, s: Seq):
        """Offer s's full pages to the prefix cache: those of its known tokens up to `target`
        (pending until written) and any written since; mark the written ones."""
        if not self.pool.prefix_cache:
            return
        Z = self.page_size
        toks = s.req.prompt + s.req.generated
        written = s.lens // Z
        while s.registered < max(written, s.target // Z):
            i = s.registered
            s.node = self.pool.register(s.pages[i], s.node, toks[i * Z:(i + 1) * Z], i < written)
            s.registered += 1
        while s.marked < written:
            self.pool.mark_written(s.pages[s.marked])
            s.marked += 1

    def _release(self, s: Seq):
        self._register(s)
        self.pool.release(s.pages)
        s.pages = []
        self.running.remove(s)

    def _preempt(self, s: Seq):
        self._release(s)
        self.waiting.appendleft(s.req)
        self.counters["preemptions"] += 1
