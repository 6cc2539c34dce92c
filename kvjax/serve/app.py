"""The HTTP layer: a FastAPI app that puts OpenAI-style requests through a `kvjax.Engine`.

Request path (HTTP -> engine -> stream):

1. `Gate` (pure ASGI middleware) checks the API key and the body size before anything is
   parsed, and counts every answer by route and status for /metrics.
2. The route parses the body itself (`protocol.parse_body`: JSON, strict types) and
   `protocol.prepare_*` checks every field against the model and the context and
   builds token-id prompts and one `SamplingParams`. Any problem is an `APIError`,
   answered as `{"error": {message, type, param, code}}` with a 4xx status.
3. `Generation` submits the prompt (`Engine.submit` returns a handle at once; its own
   checks raise ValueError -> 400) and starts a small thread that iterates the handle's
   blocking token iterator and hands each token to the event loop
   (`loop.call_soon_threadsafe`). The event loop never blocks on the engine; the engine
   batches every request in flight (continuous batching), whatever the HTTP concurrency.
4. Tokens become text through `TextStream` (exact incremental detokenization, stop
   strings); a stop string cancels the request in the engine. Streaming answers are
   server-sent events (`data: {...}` chunks, `data: [DONE]` last); a client that goes
   away cancels its request (`handle.cancel()` frees the slot and the pages) - streaming
   or not.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .metrics import CONTENT_TYPE_LATEST, Metrics, RequestTimer
from .textstream import TextStream, token_bytes, token_text

log = logging.getLogger("kvjax.serve")

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
OPEN_PATHS = ("/health", "/metrics")          # answered without the API key


class ServerState:
    """What every route needs: the engine, the tokenizer, the limits, the metrics."""

    def __init__(self, engine, tokenizer, model_id: str, context: int, vocab_size: int,
                 eos_ids=()):
        self.engine = engine
        self.tok = tokenizer
        self.limits = P.Limits(model_id=model_id, context=int(context), vocab_size=int(vocab_size),
                               eos_ids=tuple(int(e) for e in eos_ids))
        self.metrics = Metrics(engine)
        self.created = int(time.time())


# ---------------------------------------------------------------- one request in the engine
class Generation:
    """One prompt in the engine, seen from the event loop.

    `run()` is an async iterator of (text_delta, new_token_ids) as tokens arrive; once it
    ends, `finish_reason`, `tokens`, `completion` are set. `cancel()` (a disconnected
    client, a stop string) removes the request from the engine.
    """

    def __init__(self, state: ServerState, prompt_ids, sampling, stop=(), logprobs=None):
        self.state = state
        self.prompt_ids = list(prompt_ids)
        self.want_logprobs = logprobs is not None
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(state.tok, stop, skip_ids=state.limits.eos_ids)
        self.tokens: list[int] = []
        self.finish_reason = None
        self.completion = None
        self.handle = state.engine.submit(self.prompt_ids, sampling)  # ValueError: caller's 400
        self.timer = RequestTimer(state.metrics)
        self._closed = False
        threading.Thread(target=self._pump, daemon=True,
                         name=f"kvjax-serve-req-{getattr(self.handle, 'request_id', '?')}").start()

    def _pump(self):  # runs in its own thread: the handle's iterator blocks
        try:
            for tok in self.handle:
                self._put(("token", int(tok)))
            self._put(("done", self.handle.result()))
        except BaseException as e:  # noqa: BLE001  (handed to the event loop, raised there)
            self._put(("error", e))

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass

    async def run(self):
        try:
            while True:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                new = []
                done = None
                for kind, value in items:
                    if kind == "token":
                        new.append(value)
                    elif kind == "done":
                        done = value
                    else:
                        raise value
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

    async def _wait_done(self):
        while True:
            kind, value = await self.queue.get()
            if kind == "done":
                return value
            if kind == "error":
                return None

    def _close(self, completion, reason=None):
        self._closed = True
        self.completion = completion
        cached = int(getattr(completion, "cached_tokens", 0) or 0) if completion else 0
        self.timer.finish(reason or self.finish_reason, len(self.prompt_ids), cached)

    def cancel(self):
        self.handle.cancel()

    def abandon(self):
        """Nobody will read the rest (the response ended or never started): stop the request."""
        if not self._closed:
            self.handle.cancel()
            self._close(None, "abort")

    # logprobs, as the engine recorded them
    def token_logprobs(self, start: int, end: int) -> list:
        if not self.want_logprobs:
            return []
        src = self.completion.logprobs if self.completion is not None and \
            self.completion.logprobs is not None else self.handle.logprobs
        return list(src[start:end]) if src is not None else []

    def prompt_logprobs(self) -> list:
        pl = getattr(self.completion, "prompt_logprobs", None)
        return list(pl) if pl is not None else [None] * len(self.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return int(getattr(self.completion, "cached_tokens", 0) or 0)


async def _consume(gen: Generation):
    async for _ in gen.run():
        pass
    return gen


async def _until_disconnected(request: Request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _run_all(request: Request, gens: list[Generation]):
    """Run generations to the end; if the client disconnects first, cancel them all."""
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
                if not g._closed:
                    g.cancel()
    if work.cancelled():
        return None
    return work.result()


def _submit_all(state: ServerState, prepared: P.Prepared) -> list[Generation]:
    """Submit every prompt; if the engine refuses one, withdraw those already submitted."""
    gens = []
    try:
        for ids, sp in zip(prepared.prompts, prepared.sampling):
            gens.append(Generation(state, ids, sp, prepared.stop, prepared.logprobs))
    except ValueError as e:
        for g in gens:
            g.abandon()
        param = "prompt" if len(prepared.prompts) == 1 else f"prompt.{len(gens)}"
        raise P.invalid(f"the engine refused the request: {e}", param) from None
    except RuntimeError as e:   # a closed engine
        for g in gens:
            g.abandon()
        raise P.APIError(503, f"the engine is not accepting requests: {e}", "server_error") from None
    return gens


# ---------------------------------------------------------------- response pieces
def _completion_logprobs(state, entries, ids, offset0=0) -> dict:
    """The legacy completions `logprobs` object for tokens `ids` with engine entries
    (TokenLogprob or None per token). text_offset: characters of the text before each token
    (a character counts once its last byte is in)."""
    tok = state.tok
    tokens, lps, tops, offsets = [], [], [], []
    count = _CharCount(tok)
    pos = offset0
    for tid, e in zip(ids, entries):
        tokens.append(token_text(tok, tid))
        lps.append(None if e is None else float(e.logprob))
        tops.append(None if e is None else {token_text(tok, k): float(v) for k, v in e.top.items()})
        offsets.append(pos)
        pos += count(tid)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class _CharCount:
    """Characters each token completes in the decoded text. Byte tokens: a UTF-8 character
    counts at its last byte; specials add none. Other tokenizers: len(decode([id]))."""

    def __init__(self, tok):
        from ..tokenizer import ByteTokenizer

        self.tok, self.bytes, self.pending = tok, isinstance(tok, ByteTokenizer), 0

    def __call__(self, tid: int) -> int:
        if not self.bytes:
            return len(self.tok.decode([tid]))
        if tid >= 256:
            return 0
        if tid & 0xC0 == 0x80 and self.pending:          # a continuation byte
            self.pending -= 1
            return 0 if self.pending else 1
        width = 4 if tid >= 0xF0 else 3 if tid >= 0xE0 else 2 if tid >= 0xC0 else 1
        self.pending = width - 1
        return 0 if self.pending else 1


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def _chat_logprobs(state, entries, ids) -> dict:
    tok = state.tok
    content = []
    for tid, e in zip(ids, entries):
        top = [] if e is None else [{"token": token_text(tok, k), "logprob": float(v),
                                     "bytes": token_bytes(tok, k)} for k, v in e.top.items()]
        content.append({"token": token_text(tok, tid),
                        "logprob": None if e is None else float(e.logprob),
                        "bytes": token_bytes(tok, tid), "top_logprobs": top})
    return {"content": content}


class _EventStream(StreamingResponse):
    """A server-sent-event response that stops its generations however it ends: finished,
    client gone (the body iterator is cancelled, or never started), or failed."""

    def __init__(self, body, gens):
        super().__init__(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._gens = gens

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for g in self._gens:
                g.abandon()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, default=P.to_jsonable)}\n\n"


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_id: str, *, context: int, vocab_size: int, eos_ids=(),
               api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` (a started `kvjax.Engine`) under the name `model_id`.

    context: the most tokens a request may hold (prompt + max_tokens); vocab_size: the
    model's; eos_ids: tokens that end an answer (never shown as text). api_key: when set,
    every route but /health and /metrics needs `Authorization: Bearer <api_key>`.
    """
    state = ServerState(engine, tokenizer, model_id, context, vocab_size, eos_ids)
    app = FastAPI(title="kvjax serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.kvjax = state

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse(P.error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}",
                                         "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _model_card():
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "kvjax",
                "max_model_len": state.limits.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise P.APIError(404, f"the model {name!r} does not exist; this server serves "
                             f"{model_id!r}", "invalid_request_error", "model", "model_not_found")
        return _model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = P.parse_body(await request.body(), P.CompletionRequest)
        prepared = P.prepare_completion(req, tokenizer, state.limits)
        gens = _submit_all(state, prepared)
        if prepared.stream:
            return _EventStream(_stream_completion(state, gens[0], prepared), gens)
        done = await _run_all(request, gens)
        if done is None:
            return Response(status_code=499)   # the client is gone; nobody reads this
        choices, n_prompt, n_out, n_cached = [], 0, 0, 0
        for i, g in enumerate(gens):
            text, fr, lp = _completion_result(state, g, prepared, i)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": fr})
            n_prompt += len(g.prompt_ids)
            n_out += 0 if prepared.score_only else len(g.tokens)
            n_cached += g.cached_tokens
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_id, "choices": choices,
                "usage": P.usage(n_prompt, n_out, n_cached)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = P.parse_body(await request.body(), P.ChatCompletionRequest)
        P.check_model(req, state.limits)
        ids = _render_chat(tokenizer, P.chat_messages(req.messages))
        prepared = P.prepare_chat(req, ids, state.limits)
        gens = _submit_all(state, prepared)
        g = gens[0]
        if prepared.stream:
            return _EventStream(_stream_chat(state, g, prepared), gens)
        if await _run_all(request, gens) is None:
            return Response(status_code=499)
        lp = (_chat_logprobs(state, g.token_logprobs(0, len(g.tokens)), g.tokens)
              if prepared.logprobs is not None else None)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text.full_text},
                             "logprobs": lp, "finish_reason": g.finish_reason}],
                "usage": P.usage(len(g.prompt_ids), len(g.tokens), g.cached_tokens)}

    # vLLM's tokenizer routes: lm-eval's `local-completions` uses them (its "remote"
    # tokenizer backend) to count context tokens with the server's own tokenizer.
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = P.parse_body(await request.body(), P.TokenizeRequest)
        P.check_model(req, state.limits)
        if (req.prompt is None) == (req.messages is None):
            raise P.invalid("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            ids = _render_chat(tokenizer, P.chat_messages(req.messages))
        else:
            ids = _encode_with_specials(tokenizer, req.prompt, bool(req.add_special_tokens))
        return {"count": len(ids), "max_model_len": state.limits.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = P.parse_body(await request.body(), P.DetokenizeRequest)
        P.check_model(req, state.limits)
        bad = [t for t in req.tokens if not 0 <= t < state.limits.vocab_size]
        if bad:
            raise P.invalid(f"tokens holds id {bad[0]}, outside the vocabulary [0, "
                            f"{state.limits.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def name(i):
            return None if i is None else tokenizer.decode([i], skip_special_tokens=False)
        info = {"tokenizer_class": type(tokenizer).__name__, "eos_token": name(tokenizer.eos_id),
                "bos_token": name(tokenizer.bos_id), "pad_token": name(tokenizer.pad_id),
                "model_max_length": state.limits.context}
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            info["chat_template"] = template
        return info

    return Gate(app, api_key=api_key, max_request_bytes=max_request_bytes, metrics=state.metrics)


def _render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Messages -> prompt token ids with the tokenizer's chat template."""
    render = getattr(tokenizer, "apply_chat_template", None)
    if render is None:
        raise P.invalid(f"this model's tokenizer ({type(tokenizer).__name__}) has no chat "
                        "template; use /v1/completions", "messages")
    try:
        out = render(messages, add_generation_prompt=True)
    except ValueError as e:
        raise P.invalid(f"cannot render messages with the chat template: {e}", "messages") from None
    if isinstance(out, str):
        # a rendered template already holds its special tokens (BOS and turn markers)
        return _encode_with_specials(tokenizer, out, add_special_tokens=False)
    return [int(t) for t in out]


def _encode_with_specials(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """encode(), with the byte tokenizer's special-token names (`<bos>`, `<eos>`, `<pad>`)
    read as their ids, as Hugging Face tokenizers read theirs."""
    from ..tokenizer import ByteTokenizer

    if not isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = [tokenizer.bos_id] if add_special_tokens and tokenizer.add_bos else []
    rest = text
    while rest:
        hits = [(rest.find(n), n) for n in tokenizer.SPECIALS if n in rest]
        if not hits:
            ids += tokenizer.encode(rest, add_special_tokens=False)
            break
        pos, name = min(hits)
        ids += tokenizer.encode(rest[:pos], add_special_tokens=False) + [tokenizer.SPECIALS[name]]
        rest = rest[pos + len(name):]
    return ids


def _completion_result(state, g: Generation, prepared: P.Prepared, index: int):
    """(text, finish_reason, logprobs) of one finished completion choice."""
    tok = state.tok
    prompt_text = prepared.prompt_texts[index]
    if prompt_text is None and prepared.echo:
        prompt_text = tok.decode(g.prompt_ids)
    text = "" if prepared.score_only else g.text.full_text
    gen_ids = [] if prepared.score_only else g.tokens
    lp = None
    if prepared.logprobs is not None:
        if prepared.echo:
            lp = _completion_logprobs(state, g.prompt_logprobs(), g.prompt_ids)
            start = len(prompt_text)
        else:
            start = 0
        gen_lp = _completion_logprobs(state, g.token_logprobs(0, len(gen_ids)), gen_ids, start)
        lp = _merge_logprobs(lp, gen_lp)
    if prepared.echo:
        text = prompt_text + text
    return text, ("length" if prepared.score_only else g.finish_reason), lp


async def _stream_completion(state, g: Generation, prepared: P.Prepared):
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.limits.model_id

    def chunk(text, lp=None, finish=None, **extra):
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
                     **extra})

    try:
        offset, echo = 0, None
        if prepared.echo:
            echo = prepared.prompt_texts[0]
            if echo is None:
                echo = state.tok.decode(g.prompt_ids)
            offset = len(echo)
        # the prompt's logprobs come with the finished request: with echo + logprobs the
        # chunks wait for it (the echo chunk must come first)
        defer = prepared.echo and prepared.logprobs is not None
        held, seen = [], 0
        async for delta, new in g.run():
            if echo is not None and not defer:
                yield chunk(echo)
                echo = None
            if prepared.score_only:
                continue
            lp = None
            if prepared.logprobs is not None and new:
                lp = _completion_logprobs(state, g.token_logprobs(seen, seen + len(new)), new, offset)
            seen += len(new)
            offset += len(delta)
            if delta or lp:
                if defer:
                    held.append(chunk(delta, lp))
                else:
                    yield chunk(delta, lp)
        if echo is not None:
            lp = None
            if prepared.logprobs is not None:
                lp = _completion_logprobs(state, g.prompt_logprobs(), g.prompt_ids)
            yield chunk(echo, lp)
        for c in held:
            yield c
        n_out = 0 if prepared.score_only else len(g.tokens)
        fr = "length" if prepared.score_only else g.finish_reason
        use = P.usage(len(g.prompt_ids), n_out, g.cached_tokens)
        yield chunk("", None, fr, usage=use)
        if prepared.include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001  (the stream has started: report in-band)
        log.exception("stream failed")
        yield _sse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
        yield "data: [DONE]\n\n"


async def _stream_chat(state, g: Generation, prepared: P.Prepared):
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.limits.model_id

    def chunk(delta, lp=None, finish=None, **extra):
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                  "finish_reason": finish}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        seen = 0
        async for delta, new in g.run():
            lp = None
            if prepared.logprobs is not None and new:
                lp = _chat_logprobs(state, g.token_logprobs(seen, seen + len(new)), new)
            seen += len(new)
            if delta or lp:
                yield chunk({"content": delta}, lp)
        use = P.usage(len(g.prompt_ids), len(g.tokens), g.cached_tokens)
        yield chunk({}, None, g.finish_reason, usage=use)
        if prepared.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001
        log.exception("stream failed")
        yield _sse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the gate (ASGI middleware)
class Gate:
    """API key, body size and per-route answer counts, before the app sees a request.

    The body is read here (up to max_request_bytes; a Content-Length above it is refused
    without reading) and replayed to the app, so an oversized body never reaches JSON
    parsing. After the body, `receive` is the server's own, so the app still learns of a
    client that disconnects.
    """

    def __init__(self, app, *, api_key=None, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
                 metrics: Metrics | None = None):
        self.app = app
        self.api_key = api_key
        self.max_bytes = int(max_request_bytes)
        self.metrics = metrics
        self.state = app.state    # FastAPI's state, for callers holding the gate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _ROUTES else "other"
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                return await _json(counted_send, 401, P.error_body(
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    "authentication_error", None, "invalid_api_key"),
                    {"www-authenticate": "Bearer"})
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                return await _json(counted_send, 413, _too_large(self.max_bytes))
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await _json(counted_send, 413, _too_large(self.max_bytes))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, counted_send)
        finally:
            if self.metrics is not None and "code" in status:
                self.metrics.http.labels(route=route, status=str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        given = _header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/tokenize", "/detokenize", "/tokenizer_info")


def _header(scope, name: bytes):
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _too_large(limit: int) -> dict:
    return P.error_body(f"the request body is larger than {limit} bytes (--max-request-bytes)",
                        "invalid_request_error", None, "request_too_large")


async def _json(send, status: int, body: dict, headers: dict | None = None):
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
