"""The server's side of the engine: what every route needs, and one prompt in flight.

`ServerState` holds the engine, the tokenizer, the limits and the metrics; `create_app`
builds one per app and the routes receive it by dependency injection.

`Generation` submits one prompt (`Engine.submit` returns a handle at once; its own checks
raise ValueError, the caller's 400) and subscribes to the handle: the engine's thread hands
each update to the event loop (`loop.call_soon_threadsafe`), so a request in flight holds
no thread of its own. The event loop never blocks on the engine; the engine batches every
request in flight (continuous batching), whatever the HTTP concurrency. `ServerState.admit`
refuses a request with 429 (Retry-After) once `max_waiting` requests wait for a slot.
Tokens become text through `TextStream`; a stop string cancels the request in the engine.

`submit_all` and `run_all` do the same for every engine request of an HTTP request (each
prompt's best_of candidates, `protocol.Prepared.requests`): all are admitted and submitted
or none is, and a client that goes away cancels them all. `best_choices` picks each
prompt's n answers among its candidates.
"""
from __future__ import annotations

import asyncio
import time

from . import protocol as P
from .metrics import Metrics, RequestTimer
from .textstream import TextStream


class ServerState:
    """What every route needs: the engine, the tokenizer, the limits, the metrics."""

    def __init__(self, engine, tokenizer, model_id: str, context: int, vocab_size: int,
                 eos_ids=(), max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.tok = tokenizer
        self.limits = P.Limits(model_id=model_id, context=int(context), vocab_size=int(vocab_size),
                               grammar=grammar_compiler(tokenizer, int(vocab_size)),
                               eos_ids=tuple(int(e) for e in eos_ids))
        self.metrics = Metrics(engine)
        self.created = int(time.time())

    def admit(self, prompts: int, param: str | None = None):
        """429 with Retry-After when `prompts` more engine requests would take the engine's
        queue of requests waiting for a slot past `max_waiting` (None: unbounded); 400 naming
        `param` when they are more than `max_waiting` on their own (no retry would help)."""
        if self.max_waiting is None:
            return
        if prompts > max(self.max_waiting, 1):
            raise P.invalid(f"this request makes {prompts} sequences (prompts x n or best_of), more than "
                            f"the {self.max_waiting} this server lets wait (--max-waiting)", param)
        waiting = self.engine.waiting()
        if waiting + prompts > self.max_waiting:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise P.APIError(429, f"the server is at capacity: {waiting} requests wait for a slot "
                             f"(--max-waiting {self.max_waiting}); retry shortly", "rate_limit_error",
                             None, "server_busy", headers={"Retry-After": "1"})


def grammar_compiler(tokenizer, vocab_size: int):
    """GrammarSpec -> the grammar compiled for this tokenizer and vocabulary (cached by
    kvjax.structured; ImportError naming the install command without llguidance)."""
    def compile_spec(spec):
        from ..structured import compile_format, tokenizer_info
        return compile_format(spec, tokenizer_info(tokenizer, vocab_size))
    return compile_spec


class Generation:
    """One prompt in the engine, seen from the event loop.

    `run()` is an async iterator of (text_delta, new_token_ids) as tokens arrive; once it
    ends, `finish_reason`, `tokens`, `completion` are set. `cancel()` (a disconnected
    client, a stop string) removes the request from the engine.
    """

    def __init__(self, state: ServerState, prompt_ids, sampling, stop=(), logprobs=None,
                 prompt_index: int = 0, candidate: int = 0):
        self.state = state
        self.prompt_index, self.candidate = prompt_index, candidate   # which prompt, which try
        self.prompt_ids = list(prompt_ids)
        self.want_logprobs = logprobs is not None
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(state.tok, stop, skip_ids=state.limits.eos_ids,
                               min_tokens=getattr(sampling, "min_tokens", 0))
        self.tokens: list[int] = []
        self.finish_reason = None
        self.completion = None
        self.handle = state.engine.submit(self.prompt_ids, sampling)  # ValueError: caller's 400
        self.timer = RequestTimer(state.metrics)
        self.closed = False
        self.handle.subscribe(self._update)

    def _update(self, tokens, completion, error):  # on the engine's thread: hand it over
        if error is not None:
            self._put(("error", error))
        elif completion is not None:
            self._put(("done", completion))
        elif tokens:
            self._put(("tokens", [int(t) for t in tokens]))

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass

    async def run(self):
        try:
            while True:
                new, done = await self._next_burst()
                self.tokens += new
                self.timer.tokens_arrived(len(new))
                delta = self.text.push(new)
                if self.text.stopped:           # a stop string: the answer ends here
                    self.handle.cancel()
                    self.finish_reason = "stop"
                    done = await self._wait_done() if done is None else done
                    self._close(done)
                    yield delta, new
                    return
                if done is not None:
                    delta += self.text.finish()
                    # "stop" (a stop token), "length", or "abort" (the engine was closed undrained)
                    self.finish_reason = done.finish_reason
                    self._close(done)
                    yield delta, new
                    return
                if delta or new:
                    yield delta, new
        finally:
            self.abandon()                      # cancelled (client gone) or an error

    async def _next_burst(self):
        """(new token ids, the Completion or None): everything queued, waiting for one item."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        new, done = [], None
        for kind, value in items:
            if kind == "tokens":
                new += value
            elif kind == "done":
                done = value
            else:
                raise value
        return new, done

    async def _wait_done(self):
        while True:
            kind, value = await self.queue.get()
            if kind == "done":
                return value
            if kind == "error":
                return None

    def _close(self, completion, reason=None):
        self.closed = True
        self.completion = completion
        cached = int(getattr(completion, "cached_tokens", 0) or 0) if completion else 0
        self.timer.finish(reason or self.finish_reason, len(self.prompt_ids), cached)

    def cancel(self):
        self.handle.cancel()

    def abandon(self):
        """Nobody will read the rest (the response ended or never started): stop the request."""
        if not self.closed:
            self.handle.cancel()
            self._close(None, "abort")

    # logprobs, as the engine recorded them
    def token_logprobs(self, start: int, end: int) -> list:
        if not self.want_logprobs:
            return []
        src = self.completion.logprobs if self.completion is not None and \
            self.completion.logprobs is not None else self.handle.logprobs
        return list(src[start:end]) if src is not None else []

    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' log-probabilities (best_of's ranking; the engine
        records them when best_of > n whether or not the client asked). -inf if none."""
        src = self.completion.logprobs if self.completion is not None else None
        if src is None:
            return float("-inf")
        return float(sum(e.logprob for e in src[:len(self.tokens)] if e is not None))

    def prompt_logprobs(self) -> list:
        pl = getattr(self.completion, "prompt_logprobs", None)
        return list(pl) if pl is not None else [None] * len(self.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return int(getattr(self.completion, "cached_tokens", 0) or 0)


def submit_all(state: ServerState, prepared: P.Prepared) -> list[Generation]:
    """Submit every engine request (prompt-major: each prompt's best_of candidates); if the
    engine refuses one, withdraw those already submitted. 429 first when the engine's queue
    is full (`ServerState.admit`)."""
    state.admit(prepared.size, "best_of" if prepared.best_of > prepared.n else "n" if prepared.n > 1 else "prompt")
    gens = []
    try:
        for i, c, ids, sp in prepared.requests():
            gens.append(Generation(state, ids, sp, prepared.stop, prepared.logprobs, i, c))
    except ValueError as e:
        for g in gens:
            g.abandon()
        i = len(gens) // prepared.best_of
        param = getattr(e, "param", None) or ("prompt" if len(prepared.prompts) == 1 else f"prompt.{i}")
        raise P.invalid(f"the engine refused the request: {e}", param) from None
    except RuntimeError as e:   # a closed engine (shutting down)
        for g in gens:
            g.abandon()
        raise P.APIError(503, f"the engine is not accepting requests: {e}", "server_error",
                         headers={"Retry-After": "5"}) from None
    return gens


def best_choices(gens: list[Generation], prepared: P.Prepared) -> list[Generation]:
    """The returned choices, in choice-index order (prompt_index * n + choice): per prompt,
    all its generations when best_of == n (in submission order), else the n candidates of
    highest cumulative log-probability, best first (ties: the earlier candidate)."""
    k, n = prepared.best_of, prepared.n
    out = []
    for start in range(0, len(gens), k):
        group = gens[start:start + k]
        out += group if k == n else pick_best(group, n, [g.cumulative_logprob() for g in group])
    return out


def pick_best(items: list, n: int, scores: list) -> list:
    """The n items of highest score, highest first; equal scores keep the input order."""
    order = sorted(range(len(items)), key=lambda j: -scores[j])
    return [items[j] for j in order[:n]]


async def run_all(request, gens: list[Generation]):
    """Run generations to the end (-> the list of them); if the client disconnects first,
    cancel them all (-> None). `request`: the Starlette request, watched for the disconnect."""
    work = asyncio.ensure_future(asyncio.gather(*(_consume(g) for g in gens)))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            try:
                await work
            except (asyncio.CancelledError, Exception):
                pass
        if work.cancelled() or work.exception() is not None:
            for g in gens:              # one failed or the client left: stop the others too
                if not g.closed:
                    g.cancel()
    if work.cancelled():
        return None
    return work.result()


async def _consume(gen: Generation):
    async for _ in gen.run():
        pass
    return gen


async def _until_disconnected(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
