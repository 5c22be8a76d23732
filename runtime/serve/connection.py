"""The uvicorn server of `python -m runtime serve`: request headers bounded in time, and a shutdown that answers.

uvicorn bounds a connection's idle time between requests (`timeout_keep_alive`) but not the request headers
themselves: a client that sends one header byte a second, or connects and sends nothing, keeps its connection
as long as it likes. `HeaderTimeoutProtocol` (uvicorn's h11 protocol) answers 408 and closes a connection whose
request headers are not complete `header_timeout` s after its first byte (or after it opened), as nginx's
client_header_timeout does. `DrainingServer` tells the service that shutdown begins before uvicorn waits for the
connections, so requests still queued for the pool get 503 at once (runtime.serve.service.Service.drain).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """h11 with a deadline for each request's headers (the class attribute, set per server by `with_header_timeout`)."""

    header_timeout = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_underway():
            self._disarm()
        elif self._header_timer is None:  # the first bytes of a next request on a kept-alive connection
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_underway(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._request_underway() or self.transport.is_closing():
            return
        log.warning("request headers from %s not complete within %g s: 408 and close", self.client, self.header_timeout)
        body = json.dumps({"status": "error", "error": f"the request headers did not arrive within "
                           f"{self.header_timeout:g} s", "error_type": "request_timeout", "request_id": None}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close"
                             b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


class DrainingServer(uvicorn.Server):
    """uvicorn's server that calls `drain()` (queued requests answered 503) as soon as shutdown begins."""

    def __init__(self, config: uvicorn.Config, drain: Any):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list | None = None) -> None:
        self.drain()
        await super().shutdown(sockets)


def run(app: Any, drain: Any, *, host: str, port: int, log_level: str, header_timeout: float) -> None:
    """Serve `app` with uvicorn until a signal; `drain` is called when shutdown begins."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            http=with_header_timeout(header_timeout))
    DrainingServer(config, drain).run()
