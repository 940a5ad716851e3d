"""How the service is put on a socket: uvicorn settings that keep one client from holding the server.

uvicorn on its own holds a connection that sends one header byte a second forever (its only
timer is the keep-alive timer, armed *after* a response), and accepts any number of them.
`uvicorn_config` therefore sets:

- `limit_concurrency = max_connections`: beyond that many connections / in-flight requests,
  new requests get uvicorn's 503 at once instead of queueing without bound;
- `timeout_keep_alive = keep_alive_timeout`: idle keep-alive connections are closed;
- an HTTP protocol (`HeaderTimeoutProtocol`, h11) that closes a connection with a `408` when the
  request line and headers have not fully arrived `header_timeout` seconds after the
  connection opened or after the first byte of the next request (slowloris). The header block
  itself is capped by h11 at 16 KiB.

The body has its own deadline (`body_timeout`, in `rlaif.service.app.BodyGuardMiddleware`), and bodies
are only read after the API key has been checked (`rlaif.service.app.AuthMiddleware`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlaif.service.settings import ServiceSettings

_TIMEOUT_BODY = b"request headers not received in time\n"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                     b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for receiving each request's line and headers."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # (part of) a request head is still to come
            if self._header_timer is None:
                self._arm_header_timer()
        else:  # the head is complete (or the connection errored): the body has its own deadline
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_header_timer()  # idle now: the keep-alive timer is in charge until the next byte

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def protocol_class(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """A `HeaderTimeoutProtocol` subclass bound to one timeout (uvicorn instantiates the class itself)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})


def uvicorn_config(app: Any, settings: ServiceSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn config `rlaif serve` (and the tests' server) runs `app` with; `options` override uvicorn's."""
    defaults: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "http": protocol_class(settings.header_timeout),
        "limit_concurrency": settings.max_connections, "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": int(settings.request_timeout) + 1, "lifespan": "on"}
    return uvicorn.Config(app, **{**defaults, **options})
