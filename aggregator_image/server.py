"""How uvicorn serves the aggregator's app, with every wait on a client bounded.

What is bounded, and where:

* the request line and headers: at most H11_MAX_INCOMPLETE_EVENT_BYTES (h11), and they must arrive
  within HEADER_TIMEOUT_SECONDS of the connection opening or of the first byte of a later request
  (HeaderDeadlineH11: uvicorn itself waits for them without limit);
* the body: at most max_body_bytes, sent within body_timeout_seconds (service.BodyLimit);
* an idle connection between requests: KEEP_ALIVE_SECONDS (uvicorn's timeout_keep_alive);
* connections and requests at once: limit_concurrency (more are answered 503).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import H11_MAX_INCOMPLETE_EVENT_BYTES, HEADER_TIMEOUT_SECONDS, KEEP_ALIVE_SECONDS

if TYPE_CHECKING:
    from fastapi import FastAPI


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time.

    The deadline starts when the connection opens and again at the first byte of each later request
    (an idle kept-alive connection is left to the keep-alive timeout); it ends when the headers are
    complete, which is when uvicorn starts a request cycle.
    """

    header_timeout_seconds = HEADER_TIMEOUT_SECONDS
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and not self._in_request():
            self._arm()  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)
        if self._in_request():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_seconds, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()


def server_config(
    app: FastAPI,
    host: str,
    port: int,
    limit_concurrency: int | None = None,
    header_timeout_seconds: float = HEADER_TIMEOUT_SECONDS,
    **options: object,
) -> uvicorn.Config:
    """The uvicorn configuration of the service (`options`: more uvicorn settings, e.g. log_config)."""
    protocol = type(
        "HeaderDeadline", (HeaderDeadlineH11,), {"header_timeout_seconds": header_timeout_seconds}
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES,
        limit_concurrency=limit_concurrency,
        **options,  # type: ignore[arg-type]
    )
