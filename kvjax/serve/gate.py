"""The gate in front of the app (pure ASGI middleware): API key, body size, answer counts.

`Gate` answers 401 without the API key (except on the open paths) and 413 for a body over
the limit, before anything is parsed, and counts every answer by route and status for
/metrics (`kvjax_http_requests_total`).
"""
from __future__ import annotations

import hmac
import json

from . import protocol as P
from .metrics import Metrics

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
OPEN_PATHS = ("/health", "/metrics")          # answered without the API key


class Gate:
    """API key, body size and per-route answer counts, before the app sees a request.

    The body is read here (up to max_request_bytes; a Content-Length above it is refused
    without reading) and replayed to the app, so an oversized body never reaches JSON
    parsing. After the body, `receive` is the server's own, so the app still learns of a
    client that disconnects. routes: the paths counted under their own name (any other
    path counts as "other", so a client cannot grow the metric's label set).
    """

    def __init__(self, app, *, api_key=None, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
                 metrics: Metrics | None = None, routes=()):
        self.app = app
        self.api_key = api_key
        self.max_bytes = int(max_request_bytes)
        self.metrics = metrics
        self.routes = frozenset(routes)
        self.state = app.state    # FastAPI's state, for callers holding the gate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._admit(scope, receive, counted_send)
        finally:
            if self.metrics is not None and "code" in status:
                path = scope.get("path", "")
                route = path if path in self.routes else "other"
                self.metrics.http.labels(route=route, status=str(status["code"])).inc()

    async def _admit(self, scope, receive, send):
        """Refuse the request here (401, 413), or hand it to the app with its body replayed."""
        if self.api_key is not None and scope.get("path", "") not in OPEN_PATHS \
                and not self._authorized(scope):
            return await _json(send, 401, P.error_body(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error", None, "invalid_api_key"), {"www-authenticate": "Bearer"})
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _json(send, 413, _too_large(self.max_bytes))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _json(send, 413, _too_large(self.max_bytes))
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, scope) -> bool:
        given = _header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


def _replay(body: bytes, receive):
    """A `receive` that gives the app the body already read, then the server's own."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
