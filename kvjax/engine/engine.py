"""`Engine`: continuous batching over a paged KV cache with a prefix cache.

A request is admitted into one of `max_slots` running places when the pool has pages for
its prompt (after the prefix cache lends what it already holds), prefilled a chunk per
iteration, then decoded `decode_steps` tokens per host round trip alongside every other
running request. Its pages are freed the moment it finishes; when the pool runs dry the
most recently admitted request is preempted and later recomputed (scheduler.py).

This file is the front: request checking, the `RequestHandle`s, the background thread
with its inbox, and the stats. It wires the two halves of vLLM v1's seam together:
`Scheduler` (scheduler.py, host only) decides what each call computes and closes the loop
on its sampled tokens; `Runner` (runner.py) owns the device and makes the calls. One
iteration of the loop (`_iteration`):
  1. cancellations, then admission (FIFO; the pool must hold the prompt's pages);
  2. one prefill chunk for every request still prefilling (rows bucketed to powers of two);
  3. `decode_steps` decode steps (one `lax.scan`) for every request decoding, after
     giving each the pages those steps can reach (preempting when the pool is dry).

Exactness: a row's logits depend only on its own tokens (rows never mix; padding and
other rows' pages are masked), so a greedy request gives the tokens `kvjax.generate`
gives for its prompt alone; a sampled one draws with fold_in(key(seed), token index).

Thread safety: submit/cancel/stats may be called from any thread; only the loop thread
touches the scheduler and the device pools.

No arrays are built here: the steps' axis letters (B rows, T chunk, W pages per row) are
those of scheduler.py, the pools' (L layers, P pages, K kv heads, Z page size, H head dim)
those of runner.py.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from queue import Queue

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..sampling_params import DEFAULTS, check_controls
from ..sampling import check_sampling
from .api import Completion, SamplingParams, TokenLogprob
from .programs import LOGPROBS_MAX
from .runner import Runner
from .scheduler import DecodeStep, Outputs, Scheduler

log = logging.getLogger("kvjax.engine")

_END = object()


class RequestHandle:
    """One submitted request. Iterate it for token ids as they are produced (blocking);
    `result()` waits for the Completion; `cancel()` stops it at the engine's next step;
    `subscribe(listener)` has updates pushed instead (no thread has to wait on it)."""

    def __init__(self, engine: "Engine", request_id: int, want_logprobs: bool):
        self._engine = engine
        self.request_id = request_id
        self._tokens: Queue = Queue()
        self._finished = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._listener = None
        self._lock = threading.Lock()
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
                    raise self._failure()
                return
            yield from item

    def result(self, timeout: float | None = None) -> Completion:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._failure()
        return self._completion

    def cancel(self):
        """Stop generating: the request ends with finish_reason "abort" and its pages are freed
        at the engine's next step. Does nothing once the request is done."""
        if not self.done:
            self._engine._cancel(self.request_id)

    def subscribe(self, listener):
        """Push updates instead of queueing them: `listener(tokens, completion, error)` is called
        on the engine's thread with each list of new token ids (completion and error None),
        then once at the end with tokens [] and the Completion or (completion None) the error
        the request failed with (a RuntimeError naming it). What arrived before is delivered first, in order.
        The listener must be quick (e.g. hand the update to an event loop). Iterating the
        handle afterwards sees nothing."""
        with self._lock:
            while not self._tokens.empty():
                item = self._tokens.get_nowait()
                if item is not _END:
                    listener(item, None, None)
            self._listener = listener
            if self.done:
                self._notify_end()

    def _failure(self) -> RuntimeError:
        err = RuntimeError(f"request {self.request_id} failed in the engine: {type(self._error).__name__}: "
                           f"{self._error}")
        err.__cause__ = self._error
        return err

    def _notify_end(self):
        self._listener([], self._completion, None if self._error is None else self._failure())

    # called by the engine's loop thread
    def _emit(self, tokens: list, logprobs: list | None):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if logprobs is not None and self.logprobs is not None:
            self.logprobs += logprobs
        with self._lock:
            if self._listener is not None:
                self._listener(tokens, None, None)
            else:
                self._tokens.put(tokens)         # one put per call, not per token: iteration unpacks

    def _finish(self, completion: Completion | None, error: BaseException | None = None):
        with self._lock:
            self._completion, self._error = completion, error
            self.finish_time = time.perf_counter()
            self._finished.set()
            if self._listener is not None:
                self._notify_end()
            else:
                self._tokens.put(_END)


class Engine:
    """Continuous batching with a paged KV cache and a prefix cache (see the module docstring).

    max_slots: requests running at once; max_len: tokens (prompt + generated) per request;
    page_size: tokens per page; num_pages: pool size (None: max_slots * pages of max_len);
    prefix_cache: share full prompt pages between requests; mesh: run on a device mesh
    (requests over "data", kv heads over "model"); cache_dtype: pool dtype (default the
    model's). decode_steps: decode steps per host round trip; prefill_chunk: prompt tokens
    prefilled per request per iteration (a long prompt does not stall decoding); seed:
    derives the keys of requests without their own seed. speculate: a `kvjax.PromptLookup` or
    `kvjax.DraftModel` (early exit included): every request's decode proposes, verifies and
    accepts its own number of tokens per step (engine/speculative.py); greedy requests give
    exactly the tokens they give without it, sampled ones the target's distribution; with
    prompt lookup, a call whose rows x (k + 1) pass its max_verify_tokens decodes plainly
    (large batches are compute-bound); stats() counts spec_proposed / spec_accepted / spec_forwards.
    """

    def __init__(self, cfg: ModelConfig, params, max_slots: int = 8, max_len: int = 512,
                 page_size: int = 16, num_pages: int | None = None, prefix_cache: bool = True,
                 mesh=None, cache_dtype=None, decode_steps: int = 8, prefill_chunk: int = 128,
                 seed: int = 0, speculate=None):
        _check_config(cfg, max_slots, max_len, page_size, decode_steps, prefill_chunk)
        _check_speculate(cfg, speculate, mesh)
        self.cfg, self.max_slots, self.max_len, self.page_size = cfg, int(max_slots), int(max_len), int(page_size)
        self.pages_per_seq = -(-self.max_len // self.page_size)
        if num_pages is None:
            num_pages = self.max_slots * self.pages_per_seq
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 1:
            raise ValueError(f"Engine: num_pages must be a positive int or None, got {num_pages!r}")
        self.num_pages, self.decode_steps = int(num_pages), int(decode_steps)
        self.prefill_chunk, self.seed = int(prefill_chunk), int(seed)
        self.dtype = jnp.dtype(cache_dtype if cache_dtype is not None else cfg.dtype)
        self.speculate = speculate
        self.runner = Runner(cfg, params, mesh, self.num_pages, self.page_size, self.dtype, self.max_slots,
                             speculate)
        self.mesh, self.params = self.runner.mesh, self.runner.params
        self.scheduler = Scheduler(self.max_slots, self.max_len, self.page_size, self.num_pages, prefix_cache,
                                   self.decode_steps, self.prefill_chunk, self.runner.min_rows,
                                   int(speculate.num_tokens) if speculate is not None else 0,
                                   _verify_budget(speculate), vocab_size=cfg.vocab_size)

        self._lock = threading.Condition()
        self._inbox: deque = deque()     # (Request, RequestHandle) submitted, not yet seen by the loop
        self._cancels: set = set()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._drain = True
        self._next_id = 0
        self._handles: dict = {}         # request id -> RequestHandle (loop thread only)
        self._suspects: set = set()      # ids running when an iteration failed, not yet finished

    @property
    def pool(self):
        """The page allocator and prefix cache (pages.PagePool)."""
        return self.scheduler.pool

    @property
    def keys(self) -> tuple:
        """The key pools on the device: L arrays [P, K, Z, H]."""
        return self.runner.keys

    @property
    def values(self) -> tuple:
        return self.runner.values

    @property
    def counters(self) -> dict:
        """The running counts of `stats()` (a copy)."""
        both = {**self.scheduler.counters, **self.runner.counters}
        return {k: both[k] for k in _COUNTERS}

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

    def warm_up(self, logprobs=(False, True), prompt_logprobs=(False,)) -> int:
        """Compile every program a request can need before the first one arrives: one idle
        call of each prefill and decode shape (`Scheduler.idle_steps`: batch buckets up to
        max_slots, chunk widths up to prefill_chunk, attention views up to max_len, the given
        logprob flags; speculative calls where the engine speculates). The engine must be
        idle; nothing is written. Returns the number of programs built (traced: 0 when an
        earlier engine of the same shapes built them all in this process; a persistent
        compilation cache then spares their XLA compiles across processes)."""
        with self._lock:               # the loop thread cannot take work meanwhile
            if self._inbox or self.scheduler.has_work():
                raise RuntimeError("Engine.warm_up needs an idle engine; call it before submitting requests")
            before = self.runner.counters["compilations"]
            for step in self.scheduler.idle_steps(logprobs, prompt_logprobs):
                if isinstance(step, DecodeStep):
                    self.runner.collect(self.runner.dispatch_decode(step))
                else:
                    self.runner.prefill(step)
            return self.runner.counters["compilations"] - before

    def waiting(self) -> int:
        """Requests submitted and not yet running (waiting for a slot or for pages)."""
        with self._lock:
            return len(self.scheduler.waiting) + len(self._inbox)

    def stats(self) -> dict:
        """Counters and pool occupancy. pages_used: pages holding data (in use by requests or
        kept by the prefix cache); pages_in_use / pages_peak: pages requests hold now / at most
        (the memory the workload needed); pages_held_peak: the peak of pages_used. With
        speculation: spec_proposed / spec_accepted (proposals verified / accepted), spec_forwards
        (row-iterations of speculative decode calls) and spec_tokens_per_forward (tokens those
        emitted per row-iteration: 1.0 is plain decoding)."""
        sched = self.scheduler
        with self._lock:
            waiting = len(sched.waiting) + len(self._inbox)
        pool = sched.pool
        out = self.counters
        out.update(pages_total=self.num_pages, pages_used=pool.used, pages_in_use=pool.in_use,
                   pages_peak=pool.peak, pages_held_peak=pool.held_peak,
                   pages_cached=pool.cached, pages_evicted=pool.evictions,
                   page_size=self.page_size, running=len(sched.running), waiting=waiting,
                   max_slots=self.max_slots)
        if self.speculate is None:
            for k in _SPEC_COUNTERS:
                out.pop(k)
        else:
            f = out["spec_forwards"]
            out["spec_tokens_per_forward"] = (out["spec_accepted"] + f) / f if f else 0.0
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
        """(the prompt as a list of ints, sp) after checking both; ValueError naming `where`."""
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"{where}: sampling must be a kvjax.SamplingParams, got {type(sp).__name__}")
        prompt = _check_prompt(prompt, self.cfg.vocab_size, self.max_len, where)
        _check_params(sp, self.cfg.vocab_size, where)
        n, max_n = len(prompt), min(int(sp.max_tokens), self.max_len - len(prompt))
        need = self.scheduler.pages_needed(n, sp.max_tokens)
        if need > self.num_pages:
            raise ValueError(f"{where}: prompt ({n}) + max_tokens ({max_n}) needs {need} pages of "
                             f"{self.page_size} tokens but the pool has num_pages={self.num_pages}")
        return prompt, sp

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
                self._inbox.append((self.scheduler.new_request(rid, prompt, sp, seed), h))
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

    def _arrivals(self) -> bool:
        """Something for the loop to see: a submission, a cancel or a close."""
        with self._lock:
            return bool(self._inbox or self._cancels or self._closing)

    def _loop(self):
        sched = self.scheduler
        while True:
            with self._lock:
                while not (self._inbox or sched.has_work() or self._closing):
                    self._lock.wait()
                while self._inbox:
                    req, handle = self._inbox.popleft()
                    self._handles[req.id] = handle
                    sched.add(req)
                cancels, self._cancels = self._cancels, set()
                closing, drain = self._closing, self._drain
            try:
                for rid in cancels:
                    self._deliver(sched.abort(rid))
                if closing and not drain:
                    self._deliver(sched.abort_all())
                if closing and not sched.has_work():
                    with self._lock:
                        if not self._inbox:
                            return
                    continue
                self._iteration()
            except BaseException as e:   # noqa: BLE001 - find the request at fault, keep serving
                self._recover(e)

    def _recover(self, error: BaseException):
        """An iteration failed. The requests that were running go back to the queue (recomputed
        from their tokens; fresh pools if the failed call took them) and, while any of them is
        unfinished, run one at a time: a request that fails alone is failed alone, with the
        error (logged with its id); the others finish with their exact tokens."""
        sched = self.scheduler
        lost = self.runner.pools_lost()
        if lost:
            self.runner.reset_pools()
        if self._suspects and len(sched.running) == 1:
            rid = sched.running[0].req.id
            log.error("engine: request %d failed alone; failing it: %s: %s", rid, type(error).__name__, error)
            sched.fail(rid)
            self._handles.pop(rid)._finish(None, error)
            sched.requeue_running(lost)          # nothing runs now; lost pages leave the prefix cache
            self._cleared(rid)
            return
        ids = sched.requeue_running(lost)
        if not ids:
            log.error("engine: an iteration failed with no request running; failing the %d queued: %s: %s",
                      len(self._handles), type(error).__name__, error)
            self._fail_all(error)
            return
        log.error("engine: an iteration of requests %s failed (%s: %s); rerunning them one at a time",
                  ids, type(error).__name__, error)
        self._suspects.update(ids)
        sched.max_slots = 1

    def _fail_all(self, error: BaseException):
        for handle in self._handles.values():
            handle._finish(None, error)
        self._handles.clear()
        self._suspects.clear()
        self.scheduler.max_slots = self.max_slots
        self.scheduler.reset()
        self.runner.reset_pools()

    # ------------------------------------------------------------------ one iteration
    def _iteration(self):
        """Prefill, then decode (see the module docstring): the scheduler picks, the runner runs."""
        sched, runner = self.scheduler, self.runner
        step = sched.schedule_prefill()
        if step is not None:
            self._deliver(sched.update_from_output(step, runner.prefill(step)))
        step = sched.schedule_decode()
        call = runner.dispatch_decode(step) if step is not None else None
        while call is not None:
            # the next call is dispatched on the device's own outputs before the host reads
            # the one in flight (when the scheduler allows it): bookkeeping overlaps the device
            nxt = sched.chain_decode(call.step, self._arrivals())
            nxt = runner.dispatch_decode(nxt, call) if nxt is not None else None
            self._deliver(sched.update_from_output(call.step, runner.collect(call)))
            call = nxt

    def _deliver(self, out: Outputs):
        """Hand an update's tokens and completions to their handles (streaming, result())."""
        handles = self._handles
        for rid, tokens, lps in out.tokens:
            handles[rid]._emit(tokens, lps)
        for completion in out.finished:
            handles.pop(completion.request_id)._finish(completion)
            self._cleared(completion.request_id)

    def _cleared(self, rid: int):
        """Request `rid` has finished or failed: no longer a suspect of a failed iteration; once
        every suspect is cleared the scheduler batches again."""
        if rid in self._suspects:
            self._suspects.discard(rid)
            if not self._suspects:
                self.scheduler.max_slots = self.max_slots


# stats()'s counters, in its order (the scheduler's and the runner's, interleaved as they always were)
_SPEC_COUNTERS = ("spec_proposed", "spec_accepted", "spec_forwards")
_COUNTERS = ("prompt_tokens", "prefill_tokens_computed", "generated_tokens", "preemptions", "prefix_hits",
             "cached_tokens", "compilations", "prefill_calls", "decode_calls", "finished", "aborted", "failed") \
    + _SPEC_COUNTERS


def _check_config(cfg: ModelConfig, max_slots, max_len, page_size, decode_steps, prefill_chunk):
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


def _verify_budget(speculate) -> int | None:
    """The scheduler's verify budget: prompt lookup's max_verify_tokens. A DraftModel's calls
    always speculate: its pools must take every token the target's take (a plain call would
    leave them behind)."""
    from ..decode.speculative import PromptLookup, verify_budget
    if not isinstance(speculate, PromptLookup):
        return None
    return verify_budget(speculate.max_verify_tokens)


def _check_speculate(cfg: ModelConfig, speculate, mesh):
    if speculate is None:
        return
    from ..decode.speculative import DraftModel, PromptLookup
    if not isinstance(speculate, (PromptLookup, DraftModel)):
        raise ValueError(f"Engine: speculate must be a kvjax.PromptLookup or kvjax.DraftModel, got "
                         f"{type(speculate).__name__}")
    speculate.check(cfg)
    if mesh is not None:
        raise ValueError("Engine: speculate= on a mesh is not supported yet; pass mesh=None")


def _check_prompt(prompt, vocab_size: int, max_len: int, where: str) -> list:
    arr = np.asarray(prompt)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{where}: the prompt must be a flat list of int token ids, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    n = int(arr.size)
    if n == 0:
        raise ValueError(f"{where}: the prompt is empty; it needs at least 1 token")
    if n >= max_len:
        raise ValueError(f"{where}: the prompt has {n} tokens but max_len={max_len} leaves "
                         f"room for at most {max_len - 1} (one new token must fit)")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValueError(f"{where}: prompt token {int(bad[0])} is {int(arr[bad[0]])}, outside the "
                         f"vocabulary [0, {vocab_size})")
    return [int(t) for t in arr]


def _check_params(sp: SamplingParams, vocab_size: int, where: str):
    mt = sp.max_tokens
    if not isinstance(mt, (int, np.integer)) or isinstance(mt, bool) or mt < 1:
        raise ValueError(f"{where}: max_tokens must be an int >= 1, got {mt!r}")
    check_sampling(sp.temperature, sp.top_k, sp.top_p, where)
    for name in DEFAULTS:                   # one value per request (generate takes per-row arrays)
        v = getattr(sp, name)
        if (name == "logit_bias" and v is not None and not isinstance(v, dict)) or \
                (name != "logit_bias" and np.ndim(v) != 0):
            raise ValueError(f"{where}: {name} must be a single {'dict' if name == 'logit_bias' else 'number'}, "
                             f"got {v!r}")
    check_controls(vocab_size, max_tokens=mt, where=where, **{name: getattr(sp, name) for name in DEFAULTS})
    if sp.guide is not None:
        info = getattr(sp.guide, "info", None)
        if not callable(getattr(sp.guide, "matcher", None)) or getattr(info, "vocab_size", None) != vocab_size:
            raise ValueError(f"{where}: guide must be a grammar compiled for this model's vocabulary of "
                             f"{vocab_size} (kvjax.structured.compile_format(spec, tokenizer_info(tok, "
                             f"{vocab_size}))), got {sp.guide!r}")
    for s in sp.stop_token_ids:
        if not isinstance(s, (int, np.integer)) or not 0 <= s < vocab_size:
            raise ValueError(f"{where}: stop token {s!r} is outside the vocabulary [0, {vocab_size})")
    if sp.seed is not None and (not isinstance(sp.seed, (int, np.integer)) or sp.seed < 0):
        raise ValueError(f"{where}: seed must be an int >= 0 or None, got {sp.seed!r}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(sp, name)
        if k is not None and (not isinstance(k, (int, np.integer)) or not 0 <= k <= LOGPROBS_MAX):
            raise ValueError(f"{where}: {name} must be None or an int in [0, {LOGPROBS_MAX}], got {k!r}")
