"""`Engine`: continuous batching over a paged KV cache with a prefix cache.

A request is admitted into one of `max_slots` running places when the pool has pages for
its prompt (after the prefix cache lends what it already holds), prefilled a chunk per
iteration, then decoded `decode_steps` tokens per host round trip alongside every other
running request. Its pages are freed the moment it finishes. When decoding needs a page
and the pool has none free (nor any cached page to evict), the most recently admitted
request is preempted: its full pages go to the prefix cache, the rest are freed, and it
waits at the head of the queue to be prefilled again from its prompt plus what it
already generated (recompute, as vLLM does by default).

One iteration of the loop (`_iteration`), run by a background thread:
  1. cancellations, then admission (FIFO; the pool must hold the prompt's pages);
  2. one prefill chunk for every request still prefilling (rows bucketed to powers of two);
  3. `decode_steps` decode steps (one `lax.scan`) for every request decoding, after
     giving each the pages those steps can reach (preempting when the pool is dry).

Exactness: a row's logits depend only on its own tokens (rows never mix; padding and
other rows' pages are masked), so a greedy request gives the tokens `kvjax.generate`
gives for its prompt alone; a sampled one draws with fold_in(key(seed), token index).

Thread safety: submit/cancel/stats may be called from any thread; only the loop thread
touches the scheduler state and the device pools.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from queue import Queue

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from . import programs
from .api import Completion, SamplingParams, TokenLogprob
from .pages import PagePool
from ..cache.paged import init_pools

_END = object()
MIN_CHUNK = 16          # narrowest prefill chunk compiled
MIN_VIEW_TOKENS = 128   # narrowest attention view (in tokens) compiled, as decode.py's MIN_LIVE


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _chunk_bucket(n: int) -> int:
    """Prefill chunk width for n tokens: powers of two up to 2 * MIN_CHUNK, then multiples of
    2 * MIN_CHUNK (16, 32, 64, 96, 128, ...): at most a third of a wide chunk is padding, and
    a prefill_chunk of 128 compiles five widths."""
    step = 2 * MIN_CHUNK
    return max(_pow2(n), MIN_CHUNK) if n <= step else -(-n // step) * step


class RequestHandle:
    """One submitted request. Iterate it for token ids as they are produced (blocking);
    `result()` waits for the Completion; `cancel()` stops it at the engine's next step."""

    def __init__(self, engine: "Engine", request_id: int, want_logprobs: bool):
        self._engine = engine
        self.request_id = request_id
        self._tokens: Queue = Queue()
        self._finished = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self.logprobs: list | None = [] if want_logprobs else None
        self.submit_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __iter__(self):
        while True:
            item = self._tokens.get()
            if item is _END:
                if self._error is not None:
                    raise RuntimeError(f"request {self.request_id} failed in the engine") from self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"request {self.request_id} failed in the engine") from self._error
        return self._completion

    def cancel(self):
        """Stop generating: the request ends with finish_reason "abort" and its pages are freed
        at the engine's next step. Does nothing once the request is done."""
        if not self.done:
            self._engine._cancel(self.request_id)

    # called by the engine's loop thread
    def _emit(self, token: int, logprob: TokenLogprob | None):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if logprob is not None and self.logprobs is not None:
            self.logprobs.append(logprob)
        self._tokens.put(token)

    def _finish(self, completion: Completion | None, error: BaseException | None = None):
        self._completion, self._error = completion, error
        self.finish_time = time.perf_counter()
        self._tokens.put(_END)
        self._finished.set()


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list
    sp: SamplingParams
    handle: RequestHandle
    max_n: int                       # tokens it may generate (max_tokens, capped by max_len)
    seed: int
    stops: frozenset
    generated: list = field(default_factory=list)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cached_tokens: int | None = None   # set at first admission
    admitted_before: bool = False
    prompt_logprobs_done: bool = False


@dataclass(eq=False)
class _Seq:
    """A running request: its pages and how far its tokens are written."""
    req: _Request
    pages: list
    target: int          # tokens to write before decoding (prompt + generated at admission)
    lens: int            # tokens written
    node: int            # prefix-cache node of the last registered/hit page
    registered: int      # full pages registered (pending or written) or hit
    marked: int          # of those, pages marked written
    phase: str = "prefill"
    tok: int = -1        # decode: the last sampled token, not yet written
    want_prompt_lp: bool = False


class Engine:
    """Continuous batching with a paged KV cache and a prefix cache (see the module docstring).

    max_slots: requests running at once; max_len: tokens (prompt + generated) per request;
    page_size: tokens per page; num_pages: pool size (None: max_slots * pages of max_len);
    prefix_cache: share full prompt pages between requests; mesh: run on a device mesh
    (requests over "data", kv heads over "model"); cache_dtype: pool dtype (default the
    model's). decode_steps: decode steps per host round trip; prefill_chunk: prompt tokens
    prefilled per request per iteration (a long prompt does not stall decoding); seed:
    derives the keys of requests without their own seed.
    """

    def __init__(self, cfg: ModelConfig, params, max_slots: int = 8, max_len: int = 512,
                 page_size: int = 16, num_pages: int | None = None, prefix_cache: bool = True,
                 mesh=None, cache_dtype=None, decode_steps: int = 8, prefill_chunk: int = 128,
                 seed: int = 0):
        for name, v in (("max_slots", max_slots), ("max_len", max_len), ("page_size", page_size),
                        ("decode_steps", decode_steps), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive int, got {v!r}")
        if max_len < 2:
            raise ValueError(f"Engine: max_len must be >= 2 (a prompt token and a new one), got {max_len}")
        if cfg.attention_sinks:
            raise ValueError(f"Engine: attention_sinks={cfg.attention_sinks} (StreamingLLM positions) "
                             f"is not supported by the paged cache; use kvjax.generate")
        if cfg.positions == "learned" and max_len > cfg.max_position:
            raise ValueError(f"Engine: max_len={max_len} exceeds the model's learned position table "
                             f"max_position={cfg.max_position}")
        self.cfg, self.max_slots, self.max_len, self.page_size = cfg, int(max_slots), int(max_len), int(page_size)
        self.pages_per_seq = -(-self.max_len // self.page_size)
        if num_pages is None:
            num_pages = self.max_slots * self.pages_per_seq
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 1:
            raise ValueError(f"Engine: num_pages must be a positive int or None, got {num_pages!r}")
        self.num_pages, self.decode_steps = int(num_pages), int(decode_steps)
        self.prefill_chunk, self.seed = int(prefill_chunk), int(seed)
        self.dtype = jnp.dtype(cache_dtype if cache_dtype is not None else cfg.dtype)
        self._place = _Placement(cfg, mesh, self.max_slots)
        self.mesh = self._place.mesh
        self.params = self._place.params(params)
        self.keys, self.values = self._new_pools()
        self.pool = PagePool(self.num_pages, self.page_size, prefix_cache)

        self._waiting: deque = deque()
        self._running: list = []
        self._lock = threading.Condition()
        self._inbox: deque = deque()
        self._cancels: set = set()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._drain = True
        self._next_id = 0
        self._live: dict = {}            # request id -> _Request not yet finished
        self._seen_programs: set = set()
        self.counters = dict(prompt_tokens=0, prefill_tokens_computed=0, generated_tokens=0,
                             preemptions=0, prefix_hits=0, cached_tokens=0, compilations=0,
                             prefill_calls=0, decode_calls=0, finished=0, aborted=0)

    def _new_pools(self):
        c = self.cfg
        return init_pools(c.num_layers, self.num_pages, c.num_kv_heads, self.page_size, c.head_dim,
                          self.dtype, self._place.pool_sharding)

    # ------------------------------------------------------------------ public API
    def submit(self, prompt, sampling: SamplingParams | None = None) -> RequestHandle:
        """Queue one request (token ids) and return its handle at once; ValueError on bad input."""
        prompt, sp = self._check(prompt, sampling or SamplingParams(), "request")
        return self._enqueue([(prompt, sp)])[0]

    def generate(self, prompts, sampling: SamplingParams | list | None = None) -> list:
        """Run every prompt to completion; Completions in input order. sampling: one
        SamplingParams for all, or one per prompt. Every input is checked before any runs."""
        return [h.result() for h in self.submit_many(prompts, sampling)]

    def submit_many(self, prompts, sampling: SamplingParams | list | None = None) -> list:
        """Queue several requests at once (checked first, all or none); their handles in order."""
        prompts = list(prompts)
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(prompts):
                raise ValueError(f"sampling has {len(sampling)} entries for {len(prompts)} prompts")
            sps = list(sampling)
        else:
            sps = [sampling or SamplingParams()] * len(prompts)
        checked = [self._check(p, sp, f"request {i}") for i, (p, sp) in enumerate(zip(prompts, sps))]
        return self._enqueue(checked)

    def stats(self) -> dict:
        """Counters and pool occupancy. pages_used: pages holding data (in use by requests or
        kept by the prefix cache); pages_in_use / pages_peak: pages requests hold now / at most
        (the memory the workload needed); pages_held_peak: the peak of pages_used."""
        with self._lock:
            waiting = len(self._waiting) + len(self._inbox)
        out = dict(self.counters)
        out.update(pages_total=self.num_pages, pages_used=self.pool.used, pages_in_use=self.pool.in_use,
                   pages_peak=self.pool.peak, pages_held_peak=self.pool.held_peak,
                   pages_cached=self.pool.cached, pages_evicted=self.pool.evictions,
                   page_size=self.page_size, running=len(self._running), waiting=waiting,
                   max_slots=self.max_slots)
        return out

    def close(self, drain: bool = True):
        """Finish (drain=True) or abort (False) every request, then stop the loop thread."""
        with self._lock:
            self._closing, self._drain = True, drain
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(drain=exc[0] is None)

    # ------------------------------------------------------------------ validation
    def _check(self, prompt, sp, where: str):
        cfg = self.cfg
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"{where}: sampling must be a kvjax.SamplingParams, got {type(sp).__name__}")
        arr = np.asarray(prompt)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{where}: the prompt must be a flat list of int token ids, got shape "
                             f"{arr.shape} dtype {arr.dtype}")
        n = int(arr.size)
        if n == 0:
            raise ValueError(f"{where}: the prompt is empty; it needs at least 1 token")
        if n >= self.max_len:
            raise ValueError(f"{where}: the prompt has {n} tokens but max_len={self.max_len} leaves "
                             f"room for at most {self.max_len - 1} (one new token must fit)")
        bad = np.flatnonzero((arr < 0) | (arr >= cfg.vocab_size))
        if bad.size:
            raise ValueError(f"{where}: prompt token {int(bad[0])} is {int(arr[bad[0]])}, outside the "
                             f"vocabulary [0, {cfg.vocab_size})")
        mt = sp.max_tokens
        if not isinstance(mt, (int, np.integer)) or isinstance(mt, bool) or mt < 1:
            raise ValueError(f"{where}: max_tokens must be an int >= 1, got {mt!r}")
        if not (np.isfinite(sp.temperature) and sp.temperature >= 0):
            raise ValueError(f"{where}: temperature must be finite and >= 0, got {sp.temperature!r}")
        if not isinstance(sp.top_k, (int, np.integer)) or sp.top_k < 0:
            raise ValueError(f"{where}: top_k must be an int >= 0 (0 disables it), got {sp.top_k!r}")
        if not 0 < sp.top_p <= 1:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {sp.top_p!r}")
        for s in sp.stop_token_ids:
            if not isinstance(s, (int, np.integer)) or not 0 <= s < cfg.vocab_size:
                raise ValueError(f"{where}: stop token {s!r} is outside the vocabulary [0, {cfg.vocab_size})")
        if sp.seed is not None and (not isinstance(sp.seed, (int, np.integer)) or sp.seed < 0):
            raise ValueError(f"{where}: seed must be an int >= 0 or None, got {sp.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(sp, name)
            if k is not None and (not isinstance(k, (int, np.integer)) or not 0 <= k <= programs.LOGPROBS_MAX):
                raise ValueError(f"{where}: {name} must be None or an int in [0, {programs.LOGPROBS_MAX}], "
                                 f"got {k!r}")
        max_n = min(int(mt), self.max_len - n)
        need = -(-(n + max_n - 1) // self.page_size)      # the last token is never written
        if need > self.num_pages:
            raise ValueError(f"{where}: prompt ({n}) + max_tokens ({max_n}) needs {need} pages of "
                             f"{self.page_size} tokens but the pool has num_pages={self.num_pages}")
        return [int(t) for t in arr], sp

    # ------------------------------------------------------------------ threads
    def _enqueue(self, checked) -> list:
        with self._lock:
            if self._closing:
                raise RuntimeError("this Engine is closed; create a new one")
            handles = []
            for prompt, sp in checked:
                rid, self._next_id = self._next_id, self._next_id + 1
                h = RequestHandle(self, rid, sp.logprobs is not None)
                seed = sp.seed if sp.seed is not None else self.seed * 1_000_003 + rid
                max_n = min(int(sp.max_tokens), self.max_len - len(prompt))
                req = _Request(rid, prompt, sp, h, max_n, seed % 2**32, frozenset(sp.stop_token_ids),
                               logprobs=[] if sp.logprobs is not None else None)
                self._inbox.append(req)
                handles.append(h)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvjax-engine", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return handles

    def _cancel(self, request_id: int):
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    def _loop(self):
        while True:
            with self._lock:
                while not (self._inbox or self._waiting or self._running or self._closing):
                    self._lock.wait()
                while self._inbox:
                    req = self._inbox.popleft()
                    self._live[req.id] = req
                    self._waiting.append(req)
                cancels, self._cancels = self._cancels, set()
                closing, drain = self._closing, self._drain
            try:
                for rid in cancels:
                    self._abort(rid)
                if closing and not drain:
                    for rid in list(self._live):
                        self._abort(rid)
                if closing and not (self._waiting or self._running):
                    with self._lock:
                        if not self._inbox:
                            return
                    continue
                self._iteration()
            except BaseException as e:   # noqa: BLE001 - fail the requests, keep serving
                self._fail_all(e)

    def _fail_all(self, error: BaseException):
        for req in list(self._live.values()):
            req.handle._finish(None, error)
        self._live.clear()
        self._waiting.clear()
        self._running.clear()
        self.pool = PagePool(self.num_pages, self.page_size, self.pool.prefix_cache)
        self.keys, self.values = self._new_pools()

    # ------------------------------------------------------------------ scheduling
    def _iteration(self):
        self._admit()
        prefilling = [s for s in self._running if s.phase == "prefill"]
        if prefilling:
            self._prefill(prefilling)
        if any(s.phase == "decode" for s in self._running):
            self._decode()

    def _admit(self):
        """Admit waiting requests (FIFO) while places and pages last. A request whose prefix
        is being computed by a running request (pending pages) waits for it and lets the
        ones behind it go first: computing the same prefix twice is what the cache avoids."""
        Z, pool = self.page_size, self.pool
        deferred = []
        while self._waiting and len(self._running) < self.max_slots:
            req = self._waiting.popleft()
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
            # keep a page per decoding request in reserve so admission does not force preemption
            reserve = sum(1 for s in self._running if s.phase == "decode")
            need = -(-L // Z) - len(hits)
            rest = pool.alloc(need) if pool.available - need >= reserve or not self._running else None
            if rest is None:
                pool.release(hits)
                self._waiting.appendleft(req)
                break
            cached = len(hits) * Z
            if not req.admitted_before:
                req.admitted_before, req.cached_tokens = True, cached
                self.counters["prompt_tokens"] += len(req.prompt)
            self.counters["prefix_hits"] += len(hits)
            self.counters["cached_tokens"] += cached
            s = _Seq(req, hits + rest, L, cached, node, len(hits), len(hits), want_prompt_lp=want_plp)
            self._running.append(s)
            self._register(s)              # its prompt's full pages, pending until written
        self._waiting.extendleft(reversed(deferred))

    def _register(self, s: _Seq):
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

    def _release(self, s: _Seq):
        self._register(s)
        self.pool.release(s.pages)
        s.pages = []
        self._running.remove(s)

    def _preempt(self, s: _Seq):
        self._release(s)
        self._waiting.appendleft(s.req)
        self.counters["preemptions"] += 1

    def _abort(self, rid: int):
        req = self._live.get(rid)
        if req is None:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        for s in self._running:
            if s.req is req:
                self._release(s)
                break
        self.counters["aborted"] += 1
        self._complete(req, "abort")

    def _complete(self, req: _Request, reason: str):
        self._live.pop(req.id, None)
        self.counters["finished"] += 1
        req.handle._finish(Completion(
            tokens=list(req.generated), finish_reason=reason, prompt_tokens=len(req.prompt),
            cached_tokens=req.cached_tokens or 0, logprobs=req.logprobs,
            prompt_logprobs=req.prompt_logprobs, request_id=req.id))

    def _emit(self, s: _Seq, token: int, lp: TokenLogprob | None) -> bool:
        """Record one generated token; True when it ends the request (which is then finished)."""
        req = s.req
        req.generated.append(token)
        if lp is not None and req.logprobs is not None:
            req.logprobs.append(lp)
        self.counters["generated_tokens"] += 1
        req.handle._emit(token, lp)
        reason = "stop" if token in req.stops else "length" if len(req.generated) >= req.max_n else None
        if reason is not None:
            self._release(s)
            self._complete(req, reason)
            return True
        return False

    # ------------------------------------------------------------------ device calls
    def _rows(self, n: int) -> int:
        return max(_pow2(n), self._place.min_rows)

    def _view(self, pages: int) -> int:
        """Page-table width (attention view) for rows reaching `pages` pages: 2^k or 1.5 x 2^k
        pages (at least MIN_VIEW_TOKENS). The reference path copies the view out of the pool,
        so its width is paid every step; the half steps keep the padding under a third."""
        lo = max(1, MIN_VIEW_TOKENS // self.page_size)
        w = max(pages, lo)
        p2 = _pow2(w)
        w = 3 * p2 // 4 if p2 >= 4 and 3 * p2 // 4 >= w else p2
        return min(w, self.pages_per_seq)

    def _table(self, seqs, B: int, W: int) -> np.ndarray:
        table = np.full((B, W), self.num_pages, np.int32)
        for b, s in enumerate(seqs):
            table[b, :min(len(s.pages), W)] = s.pages[:W]
        return table

    def _samp(self, seqs, B: int) -> dict:
        temp, top_k, top_p, seed = (np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32),
                                    np.zeros(B, np.uint32))
        for b, s in enumerate(seqs):
            sp = s.req.sp
            temp[b], top_k[b], top_p[b], seed[b] = sp.temperature, sp.top_k, sp.top_p, s.req.seed
        return dict(temperature=temp, top_k=top_k, top_p=top_p, seed=seed)

    def _count_compiles(self, fn, key, before: int):
        after = fn._cache_size()
        self.counters["compilations"] += max(after - before, 0)
        self._seen_programs.add(key)

    def _lp(self, logprob, top, ids, k: int, token: int) -> TokenLogprob:
        return TokenLogprob(int(token), float(logprob), {int(i): float(v) for i, v in zip(ids[:k], top[:k])})

    def _prefill(self, seqs):
        seqs = seqs[:self.max_slots]
        n = [min(self.prefill_chunk, s.target - s.lens) for s in seqs]
        B = self._rows(len(seqs))
        T = min(_chunk_bucket(max(n)), max(self.prefill_chunk, MIN_CHUNK))
        W = self._view(max(-(-(s.lens + k) // self.page_size) for s, k in zip(seqs, n)))
        tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        lengths, starts, index = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        want_lp = want_plp = False
        for b, (s, k) in enumerate(zip(seqs, n)):
            toks = s.req.prompt + s.req.generated
            tokens[b, :k] = toks[s.lens:s.lens + k]
            nxt = toks[s.lens + 1:s.lens + k + 1]
            targets[b, :len(nxt)] = nxt
            lengths[b], starts[b], index[b] = k, s.lens, len(s.req.generated)
            ends = s.lens + k == s.target
            want_lp |= ends and s.req.sp.logprobs is not None
            want_plp |= s.want_prompt_lp
        samp = self._samp(seqs, B)
        samp["targets"] = targets
        fn = programs.prefill_chunk
        before = fn._cache_size()
        args = self._place.rows(tokens, lengths, starts, self._table(seqs, B, W), samp, index)
        out, self.keys, self.values = fn(self.cfg, self.params, self.keys, self.values, *args, want_lp, want_plp,
                                         self._place.pool_sharding)
        out = jax.device_get(out)
        self._count_compiles(fn, ("prefill", B, T, W, want_lp, want_plp), before)
        self.counters["prefill_calls"] += 1
        for b, (s, k) in enumerate(zip(seqs, n)):
            req = s.req
            if s.want_prompt_lp:
                if s.lens == 0:
                    req.prompt_logprobs = [None]
                kk = req.sp.prompt_logprobs
                for t in range(k):
                    if s.lens + t + 1 < len(req.prompt):
                        req.prompt_logprobs.append(self._lp(out["p_logprob"][b, t], out["p_top"][b, t],
                                                            out["p_top_ids"][b, t], kk, targets[b, t]))
            s.lens += k
            self.counters["prefill_tokens_computed"] += k
            self._register(s)
            if s.lens == s.target:
                req.prompt_logprobs_done |= s.want_prompt_lp
                s.want_prompt_lp = False
                tok = int(out["token"][b])
                lp = (self._lp(out["logprob"][b], out["top"][b], out["top_ids"][b], req.sp.logprobs, tok)
                      if req.sp.logprobs is not None else None)
                if not self._emit(s, tok, lp):
                    s.phase, s.tok = "decode", tok

    def _decode(self):
        """Decode calls of `decode_steps` steps. While no row can finish inside the call in
        flight (none has a stop token or reaches max_tokens in it) and nothing waits for a
        free place, the next call is dispatched on the device's own outputs before the host
        reads the one in flight: the host's bookkeeping overlaps the device's work."""
        Z, k = self.page_size, self.decode_steps
        for s in [s for s in self._running if s.phase == "decode"]:   # oldest first
            if s not in self._running:
                continue                                             # preempted for an older one
            need = -(-(s.lens + min(k, s.req.max_n - len(s.req.generated))) // Z) - len(s.pages)
            while need > 0:
                got = self.pool.alloc(need)
                if got is not None:
                    s.pages += got
                    break
                victim = self._running[-1]
                self._preempt(victim)
                if victim is s:
                    break
        seqs = [s for s in self._running if s.phase == "decode"]
        if not seqs:
            return
        call = self._dispatch_decode(seqs, None)
        while call is not None:
            nxt = self._dispatch_decode(seqs, call) if self._can_chain(call) else None
            self._collect_decode(call)
            call = nxt

    def _can_chain(self, call) -> bool:
        k = self.decode_steps
        if any(s.phase != "decode" for s in self._running) or any(s not in self._running for s in call.seqs) \
                or len(call.seqs) != len(self._running):
            return False
        with self._lock:
            arrivals = bool(self._inbox or self._cancels or self._closing)
        if arrivals or (self._waiting and len(self._running) < self.max_slots):
            return False
        # rows that may end inside the call in flight (a stop token, or max_tokens reached):
        # with requests waiting for their places, or when the rows left would fit a narrower
        # (cheaper) program, go back to the host instead
        sure = sum(1 for s, n in zip(call.seqs, call.n_start) if not s.req.stops and n + k < s.req.max_n)
        if sure < len(call.seqs) and (self._waiting or self._rows(sure) != self._rows(len(call.seqs))):
            return False
        if sure == 0:
            return False
        # pages for the chained call: its rows start k tokens further on
        Z = self.page_size
        for s, lens, n in zip(call.seqs, call.lens_start, call.n_start):
            need = -(-(lens + k + max(min(k, s.req.max_n - n - k), 0)) // Z) - len(s.pages)
            if need > 0:
                got = self.pool.alloc(need)
                if got is None:
                    return False
                s.pages += got
        return True

    def _dispatch_decode(self, seqs, prev):
        """Start one decode call (asynchronously); `prev`: the call in flight whose outputs
        (last tokens, lengths, counts, active flags) this one continues on the device."""
        k = self.decode_steps
        B = self._rows(len(seqs))
        W = self._view(max(len(s.pages) for s in seqs))
        table = self._table(seqs, B, W)
        if prev is None:
            stop_w = max(4, _pow2(max(len(s.req.stops) for s in seqs)))
            state = self._samp(seqs, B)
            state.update(tok=np.zeros(B, np.int32), lens=np.zeros(B, np.int32), n=np.zeros(B, np.int32),
                         active=np.zeros(B, bool), max_n=np.zeros(B, np.int32),
                         stops=np.full((B, stop_w), -1, np.int32))
            want_lp = False
            for b, s in enumerate(seqs):
                state["tok"][b], state["lens"][b], state["n"][b] = s.tok, s.lens, len(s.req.generated)
                state["active"][b], state["max_n"][b] = True, s.req.max_n
                state["stops"][b, :len(s.req.stops)] = sorted(s.req.stops)
                want_lp |= s.req.sp.logprobs is not None
            state, table = self._place.rows(state, table)
            lens_start, n_start = [s.lens for s in seqs], [len(s.req.generated) for s in seqs]
        else:
            state = {**prev.state, **prev.final}
            (table,) = self._place.rows(table)
            want_lp, stop_w = prev.want_lp, prev.stop_w
            lens_start = [x + k for x in prev.lens_start]
            n_start = [x + k for x in prev.n_start]
        fn = programs.decode_steps
        before = fn._cache_size()
        toks, emitted, extra, final, self.keys, self.values = fn(
            self.cfg, self.params, self.keys, self.values, state, table, k, want_lp, self._place.pool_sharding)
        self._count_compiles(fn, ("decode", B, W, stop_w, want_lp), before)
        self.counters["decode_calls"] += 1
        return _DecodeCall(seqs, state, final, (toks, emitted, extra), want_lp, stop_w, lens_start, n_start)

    def _collect_decode(self, call):
        """Read a decode call's tokens (waits for it) and hand them to their requests."""
        toks, emitted, extra = jax.device_get(call.outputs)
        for b, s in enumerate(call.seqs):
            if s not in self._running:
                continue
            for i in range(self.decode_steps):
                if not emitted[i, b]:
                    break
                s.lens += 1                    # the token fed at this step is now written
                tok = int(toks[i, b])
                lp = (self._lp(extra[0][i, b], extra[1][i, b], extra[2][i, b], s.req.sp.logprobs, tok)
                      if call.want_lp and s.req.sp.logprobs is not None else None)
                if self._emit(s, tok, lp):
                    break
                s.tok = tok


@dataclass
class _DecodeCall:
    seqs: list
    state: dict          # the call's inputs (device)
    final: dict          # its final tok, lens, n, active (device)
    outputs: tuple       # tokens [k, B], emitted [k, B], logprob outputs (device)
    want_lp: bool
    stop_w: int
    lens_start: list
    n_start: list


class _Placement:
    """Where the engine's arrays live: one device, or a mesh (requests over "data", kv heads
    of the pools and the model's heads over "model", the pool's pages replicated over data)."""

    def __init__(self, cfg: ModelConfig, mesh, max_slots: int):
        self.cfg, self.mesh = cfg, mesh
        self.min_rows = 1
        self.pool_sharding = None
        if mesh is None:
            return
        from .. import sharding
        sharding.check_mesh(cfg, mesh)
        self.mesh = mesh = sharding.auto_axes(mesh)   # jax.make_mesh's Explicit axes: see sharding.py
        d = mesh.shape["data"]
        self.min_rows = _pow2(d)
        if self.min_rows != d:
            raise ValueError(f"Engine: the mesh's data axis ({d}) must be a power of two (request rows "
                             f"are bucketed to powers of two and split over it)")
        from jax.sharding import NamedSharding, PartitionSpec as P
        heads = sharding.layout(cfg, mesh)["kv_heads"]
        self.pool_sharding = NamedSharding(mesh, P(None, heads, None, None))

    def params(self, params):
        if self.mesh is None:
            return params
        from ..sharding import shard_params
        return shard_params(self.cfg, params, self.mesh)

    def rows(self, *trees):
        """Host arrays whose first axis is the request rows, placed for the program."""
        if self.mesh is None:
            return trees          # jit moves NumPy arguments itself (its fast C++ path)
        from ..sharding import batch_sharding, to_global
        return jax.tree.map(lambda a: to_global(a, batch_sharding(self.mesh, np.ndim(a))), trees)
