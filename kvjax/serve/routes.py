"""The HTTP routes of `kvjax serve`, one plain handler each, in `ROUTES` (method, path, handler).

Every handler receives the app's `ServerState` by FastAPI dependency injection
(`Depends(server_state)`: `create_app` puts it in `app.state.kvjax`); nothing is captured
in closures, so each handler reads alone. A generation route reads the raw body itself
(`protocol.parse_body`: JSON, strict types), has it checked and prepared by
`protocol.prepare_*`, submits it (`generation.submit_all`: every prompt's n or best_of
choices, all or none) and answers with a whole body or a server-sent-event stream
(`responses`). A body of OFF_LOOP_BYTES or more is parsed and
tokenized in a worker thread, so a large request never stalls the event loop (and with it
every stream and /health). Any problem is a `protocol.APIError`, which
the app answers as an OpenAI error object.

/tokenize, /detokenize and /tokenizer_info are vLLM's tokenizer routes: lm-eval's
`local-completions` uses them (its "remote" tokenizer backend) to count context tokens
with the server's own tokenizer.
"""
from __future__ import annotations

import asyncio

from fastapi import Depends, Request
from fastapi.responses import Response

from . import protocol as P
from .generation import ServerState, run_all, submit_all
from .metrics import CONTENT_TYPE_LATEST
from .tools import renders_tools
from .responses import EventStream, chat_body, completion_body, stream_chat, stream_completion


OFF_LOOP_BYTES = 64 * 1024


async def _prepared(request: Request, prepare):
    """prepare(raw body) on the event loop for a small body, in a worker thread for a large one."""
    raw = await request.body()
    if len(raw) < OFF_LOOP_BYTES:
        return prepare(raw)
    return await asyncio.to_thread(prepare, raw)


async def server_state(request: Request) -> ServerState:
    """The app's ServerState (async: a plain def dependency would run in a thread pool)."""
    return request.app.state.kvjax


# ---------------------------------------------------------------- service and models
async def health():
    return {"status": "ok"}


async def metrics(state: ServerState = Depends(server_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> dict:
    return {"id": state.limits.model_id, "object": "model", "created": state.created,
            "owned_by": "kvjax", "max_model_len": state.limits.context}


async def models(state: ServerState = Depends(server_state)):
    return {"object": "list", "data": [_model_card(state)]}


async def model(name: str, state: ServerState = Depends(server_state)):
    if name != state.limits.model_id:
        raise P.APIError(404, f"the model {name!r} does not exist; this server serves "
                         f"{state.limits.model_id!r}", "invalid_request_error", "model",
                         "model_not_found")
    return _model_card(state)


# ---------------------------------------------------------------- generation
async def completions(request: Request, state: ServerState = Depends(server_state)):
    prepared = await _prepared(request, lambda raw: P.prepare_completion(
        P.parse_body(raw, P.CompletionRequest), state.tok, state.limits))
    gens = submit_all(state, prepared)
    if prepared.stream:
        return EventStream(stream_completion(state, gens, prepared), gens)
    if await run_all(request, gens) is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    return completion_body(state, gens, prepared)


def _prepare_chat(raw: bytes, state: ServerState) -> P.Prepared:
    req = P.parse_body(raw, P.ChatCompletionRequest)
    P.check_model(req, state.limits)
    plan = P.tool_plan(req)
    tools = None
    if plan is not None and plan.mode != "none" and renders_tools(state.tok):
        tools = list(plan.tools)
    elif plan is not None and plan.mode == "auto":
        raise P.invalid("this model's chat template does not show the model its tools, so it cannot "
                        "choose to call one: restart the server with --chat-template FILE (a template "
                        "that renders `tools`), or force a call with tool_choice", "tools")
    ids = _render_chat(state.tok, P.chat_messages(req.messages), tools)
    return P.prepare_chat(req, ids, state.limits)


async def chat_completions(request: Request, state: ServerState = Depends(server_state)):
    prepared = await _prepared(request, lambda raw: _prepare_chat(raw, state))
    gens = submit_all(state, prepared)
    if prepared.stream:
        return EventStream(stream_chat(state, gens, prepared), gens)
    if await run_all(request, gens) is None:
        return Response(status_code=499)
    return chat_body(state, gens, prepared)


# ---------------------------------------------------------------- tokenizer (vLLM's routes)
def _tokenized(raw: bytes, state: ServerState) -> dict:
    req = P.parse_body(raw, P.TokenizeRequest)
    P.check_model(req, state.limits)
    if (req.prompt is None) == (req.messages is None):
        raise P.invalid("give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        ids = _render_chat(state.tok, P.chat_messages(req.messages))
    else:
        ids = _encode_with_specials(state.tok, req.prompt, bool(req.add_special_tokens))
    return {"count": len(ids), "max_model_len": state.limits.context, "tokens": ids}


async def tokenize(request: Request, state: ServerState = Depends(server_state)):
    return await _prepared(request, lambda raw: _tokenized(raw, state))


def _detokenized(raw: bytes, state: ServerState) -> dict:
    req = P.parse_body(raw, P.DetokenizeRequest)
    P.check_model(req, state.limits)
    bad = [t for t in req.tokens if not 0 <= t < state.limits.vocab_size]
    if bad:
        raise P.invalid(f"tokens holds id {bad[0]}, outside the vocabulary [0, "
                        f"{state.limits.vocab_size})", "tokens")
    return {"prompt": state.tok.decode(req.tokens)}


async def detokenize(request: Request, state: ServerState = Depends(server_state)):
    return await _prepared(request, lambda raw: _detokenized(raw, state))


async def tokenizer_info(state: ServerState = Depends(server_state)):
    tok = state.tok
    info = {"tokenizer_class": type(tok).__name__, "eos_token": _token_name(tok, tok.eos_id),
            "bos_token": _token_name(tok, tok.bos_id), "pad_token": _token_name(tok, tok.pad_id),
            "model_max_length": state.limits.context}
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        info["chat_template"] = template
    return info


# the order matters where paths overlap: /v1/models before /v1/models/{name}
ROUTES = (
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{name:path}", model),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
)
# the fixed paths, counted by name in kvjax_http_requests_total
COUNTED_PATHS = tuple(path for _, path, _ in ROUTES if "{" not in path)


# ---------------------------------------------------------------- prompts
def _render_chat(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """Messages (and the functions the model may call) -> prompt token ids with the
    tokenizer's chat template."""
    from ..tokenizer import ByteTokenizer

    render = getattr(tokenizer, "apply_chat_template", None)
    no_template = getattr(tokenizer, "chat_template", "") is None and not isinstance(tokenizer, ByteTokenizer)
    if render is None or no_template:     # ByteTokenizer's None means its built-in format
        raise P.invalid(f"this model's tokenizer ({type(tokenizer).__name__}) has no chat "
                        "template: use /v1/completions, or restart the server with "
                        "--chat-template FILE", "messages")
    try:
        out = render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
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
    return tokenizer.encode_with_specials(text, add_special_tokens=add_special_tokens)


def _token_name(tokenizer, token_id):
    """A special token's text (None when the tokenizer has no such token)."""
    return None if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)
