"""Answers out: the OpenAI response bodies and server-sent-event streams of finished and
running `Generation`s.

Whole answers: `completion_body` (one choice per prompt) and `chat_body`. Streams:
`stream_completion` and `stream_chat` yield `data: {...}` chunks (the text deltas, then a
chunk with the finish reason and usage, a usage-only chunk when `stream_options.
include_usage` asks, and `data: [DONE]`), sent by `EventStream`, which stops the
generations however the response ends and reports a failure in-band (the status line is
gone by then). Log-probabilities: `completion_logprobs` (the legacy completions object,
with text offsets) and `chat_logprobs` (the chat `content` list), from the engine's
`TokenLogprob` entries.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi.responses import StreamingResponse

from . import protocol as P
from .generation import Generation
from .textstream import token_bytes, token_text

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


def _prompt_text(state, g: Generation, prepared: P.Prepared, index: int) -> str:
    """The prompt as echoed: the text sent, or the decoded ids of a token-id prompt."""
    text = prepared.prompt_texts[index]
    return state.tok.decode(g.prompt_ids) if text is None else text


def completion_result(state, g: Generation, prepared: P.Prepared, index: int):
    """(text, finish_reason, logprobs) of one finished completion choice."""
    text = "" if prepared.score_only else g.text.full_text
    gen_ids = [] if prepared.score_only else g.tokens
    lp, start = None, 0
    if prepared.echo:
        prompt_text = _prompt_text(state, g, prepared, index)
        start = len(prompt_text)
    if prepared.logprobs is not None:
        if prepared.echo:
            lp = completion_logprobs(state, g.prompt_logprobs(), g.prompt_ids)
        gen_lp = completion_logprobs(state, g.token_logprobs(0, len(gen_ids)), gen_ids, start)
        lp = _merge_logprobs(lp, gen_lp)
    if prepared.echo:
        text = prompt_text + text
    return text, ("length" if prepared.score_only else g.finish_reason), lp


def completion_body(state, gens: list[Generation], prepared: P.Prepared) -> dict:
    """The /v1/completions answer: one choice per prompt, usage summed over them."""
    choices, n_prompt, n_out, n_cached = [], 0, 0, 0
    for i, g in enumerate(gens):
        text, fr, lp = completion_result(state, g, prepared, i)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": fr})
        n_prompt += len(g.prompt_ids)
        n_out += 0 if prepared.score_only else len(g.tokens)
        n_cached += g.cached_tokens
    return {**_head("cmpl", "text_completion", state.limits.model_id), "choices": choices,
            "usage": P.usage(n_prompt, n_out, n_cached)}


def chat_body(state, g: Generation, prepared: P.Prepared) -> dict:
    """The /v1/chat/completions answer: one assistant message."""
    lp = (chat_logprobs(state, g.token_logprobs(0, len(g.tokens)), g.tokens)
          if prepared.logprobs is not None else None)
    return {**_head("chatcmpl", "chat.completion", state.limits.model_id),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text.full_text},
                         "logprobs": lp, "finish_reason": g.finish_reason}],
            "usage": P.usage(len(g.prompt_ids), len(g.tokens), g.cached_tokens)}


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


def _text_chunk(head: dict, text: str, lp=None, finish=None, **extra) -> str:
    return sse({**head, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                     "finish_reason": finish}], **extra})


def _delta_chunk(head: dict, delta: dict, lp=None, finish=None, **extra) -> str:
    return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                     "finish_reason": finish}], **extra})


def _closing(head: dict, last: str, use: dict, include_usage: bool) -> list[str]:
    """The chunk with the finish reason, a usage-only chunk if asked, then [DONE]."""
    usage_only = [sse({**head, "choices": [], "usage": use})] if include_usage else []
    return [last, *usage_only, _DONE]


async def stream_completion(state, g: Generation, prepared: P.Prepared):
    """The SSE chunks of one streamed completion (echo first when asked)."""
    head = _head("cmpl", "text_completion", state.limits.model_id)
    echo = _prompt_text(state, g, prepared, 0) if prepared.echo else None
    # the prompt's logprobs come with the finished request: with echo + logprobs the
    # chunks wait for it (the echo chunk must come first)
    defer = prepared.echo and prepared.logprobs is not None
    held, seen, offset = [], 0, len(echo) if echo is not None else 0
    async for delta, new in g.run():
        if echo is not None and not defer:
            yield _text_chunk(head, echo)
            echo = None
        if prepared.score_only:
            continue
        lp = None
        if prepared.logprobs is not None and new:
            lp = completion_logprobs(state, g.token_logprobs(seen, seen + len(new)), new, offset)
        seen += len(new)
        offset += len(delta)
        if delta or lp:
            if defer:
                held.append(_text_chunk(head, delta, lp))
            else:
                yield _text_chunk(head, delta, lp)
    if echo is not None:
        lp = None
        if prepared.logprobs is not None:
            lp = completion_logprobs(state, g.prompt_logprobs(), g.prompt_ids)
        yield _text_chunk(head, echo, lp)
    for chunk in held:
        yield chunk
    fr = "length" if prepared.score_only else g.finish_reason
    use = P.usage(len(g.prompt_ids), 0 if prepared.score_only else len(g.tokens), g.cached_tokens)
    for chunk in _closing(head, _text_chunk(head, "", None, fr, usage=use), use,
                          prepared.include_usage):
        yield chunk


async def stream_chat(state, g: Generation, prepared: P.Prepared):
    """The SSE chunks of one streamed chat answer (the role first, then content deltas)."""
    head = _head("chatcmpl", "chat.completion.chunk", state.limits.model_id)
    yield _delta_chunk(head, {"role": "assistant", "content": ""})
    seen = 0
    async for delta, new in g.run():
        lp = None
        if prepared.logprobs is not None and new:
            lp = chat_logprobs(state, g.token_logprobs(seen, seen + len(new)), new)
        seen += len(new)
        if delta or lp:
            yield _delta_chunk(head, {"content": delta}, lp)
    use = P.usage(len(g.prompt_ids), len(g.tokens), g.cached_tokens)
    for chunk in _closing(head, _delta_chunk(head, {}, None, g.finish_reason, usage=use), use,
                          prepared.include_usage):
        yield chunk
