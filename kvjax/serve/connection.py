"""uvicorn's HTTP/1.1 protocol with a header timeout (uvicorn has none of its own).

uvicorn times out idle keep-alive connections, but a connection that sends part of its
request headers and then nothing is held open forever (and a graceful shutdown waits for
it). `timed_protocol(seconds)` makes the h11 protocol class `kvjax serve` runs: a
connection whose request headers are not complete `seconds` after its first byte (or after
its previous response) is closed. The body has its own timeout in the gate (gate.py).
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    header_timeout: float = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._between_requests():
            self._arm()
        super().data_received(data)
        if self._header_timer is not None and not self._between_requests():
            # the headers are complete: disarm, so an idle keep-alive connection is left to
            # uvicorn's keep-alive timeout instead of being closed under a client reusing it
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        """No request is being answered: the next bytes are (part of) request headers."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


def timed_protocol(seconds: float) -> type:
    """The h11 protocol class with request headers timed out after `seconds`."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(seconds)})
