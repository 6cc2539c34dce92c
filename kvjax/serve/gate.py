"""The gate in front of the app (pure ASGI middleware): API key, origin, body, answer counts.

`Gate` answers, before anything is parsed: 401 without the API key (except on the open
paths); on a server without an API key, 403 for a `Host` or `Origin` that is not an allowed
host (by default the loopback names: a web page the user visits cannot drive a local server
through cross-site requests or DNS rebinding) and 415 for a POST body that is not JSON
(`text/plain` is what a cross-site form may send without asking); 413 for a body over the
limit; 408 for a body that does not arrive within `body_timeout` seconds (a client sending
half a body cannot hold a connection forever). It counts every answer by route and status
for /metrics (`kvjax_http_requests_total`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
from urllib.parse import urlsplit

from . import protocol as P
from .metrics import Metrics

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0                   # seconds between the headers and the body's end
OPEN_PATHS = ("/health", "/metrics")          # answered without the API key
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # the hosts a server without an API key answers


class Gate:
    """API key, body size and per-route answer counts, before the app sees a request.

    The body is read here (up to max_request_bytes; a Content-Length above it is refused
    without reading) and replayed to the app, so an oversized body never reaches JSON
    parsing. After the body, `receive` is the server's own, so the app still learns of a
    client that disconnects. routes: the paths counted under their own name (any other
    path counts as "other", so a client cannot grow the metric's label set).
    """

    def __init__(self, app, *, api_key=None, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
                 metrics: Metrics | None = None, routes=(), allowed_hosts=LOOPBACK,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.api_key = api_key
        # None or "*": any host (the operator's choice); only checked without an API key
        self.hosts = None if allowed_hosts is None or "*" in allowed_hosts else \
            frozenset(h.lower().strip("[]") for h in allowed_hosts)
        self.body_timeout = float(body_timeout)
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
        """Refuse the request here (401, 403, 415, 413, 408), or hand it to the app with its
        body replayed."""
        if self.api_key is not None and scope.get("path", "") not in OPEN_PATHS \
                and not self._authorized(scope):
            return await _json(send, 401, P.error_body(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error", None, "invalid_api_key"), {"www-authenticate": "Bearer"})
        refusal = self._keyless_refusal(scope) if self.api_key is None else None
        if refusal is not None:
            return await _json(send, *refusal)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _json(send, 413, _too_large(self.max_bytes))
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                return await _json(send, 408, P.error_body(
                    f"the request body did not arrive within {self.body_timeout:g} s", "invalid_request_error",
                    None, "request_timeout"), {"connection": "close"})
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _json(send, 413, _too_large(self.max_bytes))
        await self.app(scope, _replay(bytes(body), receive), send)

    def _keyless_refusal(self, scope):
        """(status, body) refusing a request to a server without an API key, or None: a Host or
        Origin outside the allowed hosts (403), a POST body that is not JSON (415)."""
        if self.hosts is not None:
            for name, value in ((b"host", _header(scope, b"host")), (b"origin", _header(scope, b"origin"))):
                host = _host_of(value, origin=name == b"origin")
                if value is not None and host not in self.hosts:
                    return 403, P.error_body(
                        f"{name.decode().title()} {value!r} is not allowed: a server without an API key answers "
                        f"only {', '.join(sorted(self.hosts))} (start it with --api-key, or name the host "
                        f"with --allowed-hosts)", "permission_error", None, "host_not_allowed")
        kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if scope.get("method") == "POST" and kind != "application/json":
            return 415, P.error_body(f"the request body must be JSON (Content-Type: application/json), got "
                                     f"{kind or 'no Content-Type'!r}", "invalid_request_error", None,
                                     "unsupported_media_type")
        return None

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


def _host_of(value, origin: bool):
    """The host name of a Host header ("name:port", "[::1]:8000") or an Origin ("http://name:port";
    "null" from sandboxed pages and files: no host), lower-cased; None if there is none."""
    if value is None:
        return None
    try:
        host = urlsplit(value if origin else f"//{value}").hostname
    except ValueError:
        return None
    return host.lower() if host else None


def _too_large(limit: int) -> dict:
    return P.error_body(f"the request body is larger than {limit} bytes (--max-request-bytes)",
                        "invalid_request_error", None, "request_too_large")


async def _json(send, status: int, body: dict, headers: dict | None = None):
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
