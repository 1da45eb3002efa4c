"""Connection limits that uvicorn has no setting for: a deadline for a request's headers and a cap on open
connections (its own settings cover the rest: --timeout-keep-alive between requests, h11's 16 KiB bound on
the header block; guard.py times out slow bodies).

Without them a client could open connections and send half a request line, needing no API key, and hold them
for ever. `guarded_h11(header_timeout, max_connections)` is uvicorn's h11 protocol with both:

    header deadline   from the moment a connection opens, or the first byte of its next request arrives, the
                      headers must be complete within `header_timeout` seconds, else the connection is closed
    connection cap    a connection past `max_connections` open ones is closed at once
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("zamba2.serve")


def guarded_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("closing a new connection: %d are open (--max-connections)", max_connections)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request's headers have started but are not complete
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection: no complete request headers within %g s (--header-timeout)",
                         header_timeout)  # fmt: skip
                self.transport.close()

    return GuardedH11Protocol
