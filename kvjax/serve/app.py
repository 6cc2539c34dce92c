"""The HTTP layer: a FastAPI app that puts OpenAI-style requests through a `kvjax.Engine`.

`create_app` builds the app: one `ServerState` (engine, tokenizer, limits, metrics), the
route handlers of `routes.ROUTES`, the error handlers below, and the `Gate` around it all.

Request path (HTTP -> engine -> stream):

1. `gate.Gate` (pure ASGI middleware) checks the API key and the body size before anything
   is parsed, and counts every answer by route and status for /metrics.
2. The route (`routes`) parses the body itself (`protocol.parse_body`: JSON, strict types)
   and `protocol.prepare_*` checks every field against the model and the context and
   builds token-id prompts and one `SamplingParams`. Any problem is an `APIError`,
   answered as `{"error": {message, type, param, code}}` with a 4xx status.
3. `generation.Generation` submits the prompt and hands its tokens from the engine's
   thread to the event loop; the event loop never blocks on the engine, which batches
   every request in flight (continuous batching), whatever the HTTP concurrency.
4. Tokens become text through `TextStream` (exact incremental detokenization, stop
   strings); a stop string cancels the request in the engine. Streaming answers are
   server-sent events (`responses`: `data: {...}` chunks, `data: [DONE]` last); a client
   that goes away cancels its request (`handle.cancel()` frees the slot and the pages) -
   streaming or not.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from . import routes
from .gate import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, LOOPBACK, Gate
from .generation import ServerState

log = logging.getLogger("kvjax.serve")


def create_app(engine, tokenizer, model_id: str, *, context: int, vocab_size: int, eos_ids=(),
               api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_waiting: int | None = None, allowed_hosts=LOOPBACK,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> Gate:
    """The ASGI app serving `engine` (a started `kvjax.Engine`) under the name `model_id`.

    context: the most tokens a request may hold (prompt + max_tokens); vocab_size: the
    model's; eos_ids: tokens that end an answer (never shown as text). api_key: when set,
    every route but /health and /metrics needs `Authorization: Bearer <api_key>`; without
    one, only `allowed_hosts` (None or "*": any) may be named by Host/Origin and POST bodies
    must be JSON (see gate.py). max_request_bytes: the largest body accepted (413 above);
    body_timeout: seconds a body may take to arrive (408 after). max_waiting: requests that
    may wait for an engine slot (429 with Retry-After beyond; None: unbounded).
    """
    state = ServerState(engine, tokenizer, model_id, context, vocab_size, eos_ids, max_waiting)
    app = FastAPI(title="kvjax serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.kvjax = state                     # what routes.server_state hands each handler
    for exc_class, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    for method, path, handler in routes.ROUTES:
        app.add_api_route(path, handler, methods=[method], response_model=None)
    return Gate(app, api_key=api_key, max_request_bytes=max_request_bytes,
                metrics=state.metrics, routes=routes.COUNTED_PATHS, allowed_hosts=allowed_hosts,
                body_timeout=body_timeout)


# ---------------------------------------------------------------- errors as OpenAI error objects
async def api_error(request: Request, exc: P.APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own answers (an unknown path, a wrong method) in the OpenAI shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(str(exc.detail), kind), status_code=exc.status_code)


async def validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(P.error_body(str(exc), "invalid_request_error"), status_code=400)


async def server_error(request: Request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}",
                                     "server_error"), status_code=500)


ERROR_HANDLERS = ((P.APIError, api_error), (StarletteHTTPException, http_error),
                  (RequestValidationError, validation_error), (Exception, server_error))
