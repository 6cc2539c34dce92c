"""Answers out: the OpenAI response bodies and server-sent-event streams of finished and
running `Generation`s.

Whole answers: `completion_body` and `chat_body`: n choices per prompt (index = prompt
index * n + choice, as OpenAI numbers them), with best_of > n the n candidates of highest
cumulative log-probability (`generation.best_choices`). Streams: `stream_completion` and
`stream_chat` yield `data: {...}` chunks (each choice's text deltas, interleaved as its
tokens arrive and tagged with its index, then a chunk with its finish reason; the last
choice to finish carries the usage; a usage-only chunk when `stream_options.include_usage`
asks, and `data: [DONE]`), sent by `EventStream`, which stops the generations however the
response ends and reports a failure in-band (the status line is gone by then).
Log-probabilities: `completion_logprobs` (the legacy completions object, with text
offsets) and `chat_logprobs` (the chat `content` list), from the engine's `TokenLogprob`
entries.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi.responses import StreamingResponse

from . import protocol as P
from .generation import Generation, best_choices
from .textstream import token_bytes, token_text
from .tools import openai_calls, parse_calls
from .toolstream import ToolCallStream

log = logging.getLogger("kvjax.serve")

_DONE = "data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------- logprobs objects
def completion_logprobs(state, entries, ids, offset0=0) -> dict:
    """The legacy completions `logprobs` object for tokens `ids` with engine entries
    (TokenLogprob or None per token). text_offset: characters of the text before each token
    (a character counts once its last byte is in). `state`: anything with `.tok`."""
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


def chat_logprobs(state, entries, ids) -> dict:
    """The chat `logprobs` object ({"content": [...]}) for tokens `ids` with engine entries."""
    tok = state.tok
    content = []
    for tid, e in zip(ids, entries):
        top = [] if e is None else [{"token": token_text(tok, k), "logprob": float(v),
                                     "bytes": token_bytes(tok, k)} for k, v in e.top.items()]
        content.append({"token": token_text(tok, tid),
                        "logprob": None if e is None else float(e.logprob),
                        "bytes": token_bytes(tok, tid), "top_logprobs": top})
    return {"content": content}


# ---------------------------------------------------------------- whole answers
def _head(prefix: str, obj: str, model: str) -> dict:
    """The fields every response object starts with: a fresh id, its type, time, model."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": model}


def _prompt_text(state, g: Generation, prepared: P.Prepared) -> str:
    """The prompt as echoed: the text sent, or the decoded ids of a token-id prompt."""
    text = prepared.prompt_texts[g.prompt_index]
    return state.tok.decode(g.prompt_ids) if text is None else text


def completion_result(state, g: Generation, prepared: P.Prepared):
    """(text, finish_reason, logprobs) of one finished completion choice."""
    text = "" if prepared.score_only else g.text.full_text
    gen_ids = [] if prepared.score_only else g.tokens
    lp, start = None, 0
    if prepared.echo:
        prompt_text = _prompt_text(state, g, prepared)
        start = len(prompt_text)
    if prepared.logprobs is not None:
        if prepared.echo:
            lp = completion_logprobs(state, g.prompt_logprobs(), g.prompt_ids)
        gen_lp = completion_logprobs(state, g.token_logprobs(0, len(gen_ids)), gen_ids, start)
        lp = _merge_logprobs(lp, gen_lp)
    if prepared.echo:
        text = prompt_text + text
    return text, ("length" if prepared.score_only else g.finish_reason), lp


def answer_usage(gens: list[Generation], prepared: P.Prepared) -> dict:
    """usage over every generation of a request. prompt_tokens counts each prompt once (its
    candidates share it); cached_tokens likewise, the fewest any of its candidates found in
    the prefix cache (the prompt was computed at least that much once). completion_tokens
    counts every candidate's tokens, best_of's discarded ones too: as OpenAI bills them, the
    server generated them, and usage is what the request cost."""
    k = max(prepared.best_of, 1)
    groups = [gens[i:i + k] for i in range(0, len(gens), k)]
    n_prompt = sum(len(group[0].prompt_ids) for group in groups)
    cached = sum(min(g.cached_tokens for g in group) for group in groups)
    n_out = 0 if prepared.score_only else sum(len(g.tokens) for g in gens)
    return P.usage(n_prompt, n_out, cached)


def completion_body(state, gens: list[Generation], prepared: P.Prepared) -> dict:
    """The /v1/completions answer: n choices per prompt, usage summed over them."""
    choices = []
    for index, g in enumerate(best_choices(gens, prepared)):
        text, fr, lp = completion_result(state, g, prepared)
        choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": fr})
    return {**_head("cmpl", "text_completion", state.limits.model_id), "choices": choices,
            "usage": answer_usage(gens, prepared)}


def chat_body(state, gens: list[Generation], prepared: P.Prepared) -> dict:
    """The /v1/chat/completions answer: n assistant messages."""
    choices = []
    for index, g in enumerate(gens):
        lp = (chat_logprobs(state, g.token_logprobs(0, len(g.tokens)), g.tokens)
              if prepared.logprobs is not None else None)
        message, finish = tool_message(g.text.full_text, prepared.tools, g.finish_reason)
        choices.append({"index": index, "message": {"role": "assistant", **message},
                        "logprobs": lp, "finish_reason": finish})
    return {**_head("chatcmpl", "chat.completion", state.limits.model_id), "choices": choices,
            "usage": answer_usage(gens, prepared)}


def tool_message(text: str, plan, finish: str) -> tuple[dict, str]:
    """An assistant answer's message fields and finish_reason: with tools, the calls parsed out
    of it (serve/tools.py) as `tool_calls` and finish_reason "tool_calls" ("stop" for a
    named function, as OpenAI); a forced call cut off by max_tokens stays text."""
    if plan is None or plan.mode == "none" or (plan.forced and finish != "stop"):
        return {"content": text}, finish
    content, calls = parse_calls(text, plan)
    if not calls:
        return {"content": content}, finish
    return {"content": content, "tool_calls": openai_calls(calls)}, \
        "stop" if plan.mode == "named" else "tool_calls"


# ---------------------------------------------------------------- streams
class EventStream(StreamingResponse):
    """A server-sent-event response that stops its generations however it ends: finished,
    client gone (the body iterator is cancelled, or never started), or failed."""

    def __init__(self, body, gens):
        super().__init__(_errors_in_band(body), media_type="text/event-stream",
                         headers=_SSE_HEADERS)
        self._gens = gens

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for g in self._gens:
                g.abandon()


async def _errors_in_band(chunks):
    """The chunks; a failure once the stream has started (status 200 is sent) becomes an
    error chunk and [DONE]. A cancellation (client gone) is not a failure."""
    try:
        async for c in chunks:
            yield c
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001  (the stream has started: report in-band)
        log.exception("stream failed")
        yield sse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
        yield _DONE


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, default=P.to_jsonable)}\n\n"


def _text_chunk(head: dict, text: str, lp=None, finish=None, index: int = 0, **extra) -> str:
    return sse({**head, "choices": [{"index": index, "text": text, "logprobs": lp,
                                     "finish_reason": finish}], **extra})


def _delta_chunk(head: dict, delta: dict, lp=None, finish=None, index: int = 0, **extra) -> str:
    return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                     "finish_reason": finish}], **extra})


def _closing(head: dict, use: dict, include_usage: bool) -> list[str]:
    """After the finish chunks: a usage-only chunk if asked, then [DONE]."""
    usage_only = [sse({**head, "choices": [], "usage": use})] if include_usage else []
    return [*usage_only, _DONE]


async def merged(gens: list[Generation]):
    """(generation, text delta, new ids) as the generations produce them, interleaved, and
    (generation, None, None) once one has ended. Leaving early stops them all."""
    if len(gens) == 1:                      # one choice: no task in between
        async for delta, new in gens[0].run():
            yield gens[0], delta, new
        yield gens[0], None, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(g):
        try:
            async for delta, new in g.run():
                queue.put_nowait((g, delta, new))
            queue.put_nowait((g, None, None))
        except Exception as e:  # noqa: BLE001  (handed to the reader, which raises it)
            queue.put_nowait((g, e, None))

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        for _ in range(len(gens)):
            while True:
                g, delta, new = await queue.get()
                if isinstance(delta, BaseException):
                    raise delta
                yield g, delta, new
                if delta is None:
                    break
    finally:
        for t in tasks:
            t.cancel()


class _CompletionChoice:
    """The chunks of one streamed completion choice (echo first when asked). With echo and
    logprobs the prompt's logprobs come with the finished request, so that choice's chunks
    wait for it (the echo chunk must come first)."""

    def __init__(self, state, g: Generation, prepared: P.Prepared, index: int):
        self.state, self.g, self.prepared, self.index = state, g, prepared, index
        self.echo = _prompt_text(state, g, prepared) if prepared.echo else None
        self.defer = prepared.echo and prepared.logprobs is not None
        self.held, self.seen = [], 0
        self.offset = len(self.echo) if self.echo is not None else 0

    def push(self, head: dict, delta: str, new: list) -> list[str]:
        out = []
        if self.echo is not None and not self.defer:
            out.append(_text_chunk(head, self.echo, index=self.index))
            self.echo = None
        if self.prepared.score_only:
            return out
        lp = None
        if self.prepared.logprobs is not None and new:
            lp = completion_logprobs(self.state, self.g.token_logprobs(self.seen, self.seen + len(new)),
                                     new, self.offset)
        self.seen += len(new)
        self.offset += len(delta)
        if delta or lp:
            chunk = _text_chunk(head, delta, lp, index=self.index)
            (self.held if self.defer else out).append(chunk)
        return out

    def finish(self, head: dict, **extra) -> list[str]:
        out = []
        if self.echo is not None:
            lp = None
            if self.prepared.logprobs is not None:
                lp = completion_logprobs(self.state, self.g.prompt_logprobs(), self.g.prompt_ids)
            out.append(_text_chunk(head, self.echo, lp, index=self.index))
        fr = "length" if self.prepared.score_only else self.g.finish_reason
        return out + self.held + [_text_chunk(head, "", None, fr, index=self.index, **extra)]


async def stream_completion(state, gens: list[Generation], prepared: P.Prepared):
    """The SSE chunks of a streamed completion: every choice's (best_of == n when streaming)."""
    head = _head("cmpl", "text_completion", state.limits.model_id)
    views = {g: _CompletionChoice(state, g, prepared, i) for i, g in enumerate(gens)}
    left = len(gens)
    async for g, delta, new in merged(gens):
        if delta is not None:
            for chunk in views[g].push(head, delta, new):
                yield chunk
            continue
        left -= 1
        extra = {"usage": answer_usage(gens, prepared)} if left == 0 else {}
        for chunk in views[g].finish(head, **extra):       # the last to finish carries the usage
            yield chunk
    for chunk in _closing(head, answer_usage(gens, prepared), prepared.include_usage):
        yield chunk


async def stream_chat(state, gens: list[Generation], prepared: P.Prepared):
    """The SSE chunks of a streamed chat answer: each choice's role first, then content deltas
    (with tools: content and tool_calls deltas from serve/toolstream.py as they form)."""
    head = _head("chatcmpl", "chat.completion.chunk", state.limits.model_id)
    index = {g: i for i, g in enumerate(gens)}
    seen = {g: 0 for g in gens}
    tooled = prepared.tools is not None and prepared.tools.mode != "none"
    calls = {g: ToolCallStream(prepared.tools) for g in gens} if tooled else {}
    for i in range(len(gens)):
        yield _delta_chunk(head, {"role": "assistant", "content": ""}, index=i)
    left = len(gens)
    async for g, delta, new in merged(gens):
        if delta is None:
            left -= 1
            extra = {"usage": answer_usage(gens, prepared)} if left == 0 else {}
            deltas, finish = calls[g].finish(g.finish_reason) if tooled else ([], g.finish_reason)
            for d in deltas:
                yield _delta_chunk(head, d, index=index[g])
            yield _delta_chunk(head, {}, None, finish, index=index[g], **extra)
            continue
        lp = None
        if prepared.logprobs is not None and new:
            lp = chat_logprobs(state, g.token_logprobs(seen[g], seen[g] + len(new)), new)
        seen[g] += len(new)
        deltas = calls[g].push(delta) if tooled else ([{"content": delta}] if delta else [])
        for k, d in enumerate(deltas or ([{"content": ""}] if lp else [])):     # the tokens' logprobs go with the first
            yield _delta_chunk(head, d, lp if k == 0 else None, index=index[g])
    for chunk in _closing(head, answer_usage(gens, prepared), prepared.include_usage):
        yield chunk
