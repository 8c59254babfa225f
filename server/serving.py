"""How ``excp serve`` runs uvicorn: a deadline for request headers, one for a client that
stops reading its answer, JSON for the protocol errors uvicorn answers itself, and an
access log without query strings.

Header deadline. uvicorn 0.54 arms no timer when a connection opens, and its keep-alive
timer is reset by every byte, so a client that sends nothing, or trickles its request
headers a byte at a time, holds a connection for ever (slowloris). :class:`ClientDeadlines`
is uvicorn's own h11 protocol with a timer more: armed when a connection opens and
after each response, cancelled once a request's headers are parsed; when it fires, the
connection is closed. A client must therefore send each request's headers within
``--client-timeout`` of connecting or of its previous response (the body has its own
deadline, :mod:`server.limits`). The subclass overrides six methods of
``uvicorn.protocols.http.h11_impl.H11Protocol`` and calls each original first, so the
h11 implementation is pinned (httptools, if installed, is not used) and WebSockets,
which no route uses, are off (the header timer would cut an upgraded connection).

Stalled readers. A client that stops reading a streamed answer (a restore, an archive
download) fills the socket and uvicorn's buffer, and the response waits for it for ever.
When the buffer is full (the transport pauses writing) a timer of ``--client-timeout``
starts; if the client has not read enough to resume writing by then, the connection
is aborted. A slow reader that keeps reading resets it each time.

Protocol errors. A request h11 cannot parse (a NUL or non-ASCII byte in the target,
request headers over h11's 16 KiB) is answered by uvicorn in plain text; here it gets
the API's ``{"error": {"code": "invalid_input", ...}}`` like every other error.

Access log. uvicorn logs each request line with its query string. The API never takes a
token there, but a client that puts one in a URL (``?access_token=``) must not leak it
into the log, so the logged line keeps the path only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.main import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

_MALFORMED = json.dumps({"error": {"code": "invalid_input", "message": (
    "malformed HTTP request (a raw control or non-ASCII byte in the URL, or request headers over "
    "16 KiB): percent-encode the URL and send smaller headers")}}).encode()


class ClientDeadlines(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose next request's headers have
    not arrived within ``client_timeout`` seconds, and drops one whose client has read
    nothing of its answer for as long."""

    client_timeout = 60.0
    """Set per server by :func:`protocol` (uvicorn constructs protocols itself)."""
    _deadline: asyncio.TimerHandle | None = None
    _stalled: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_request():  # no pipelined request was started meanwhile
            self._arm()

    def pause_writing(self) -> None:
        """The client stopped reading (the transport's buffer is full): unless it reads
        again within the timeout, the connection is dropped — closed *with* its unsent
        bytes, as a polite close would wait for a reader that never comes."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.client_timeout, self._abandon)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _abandon(self) -> None:
        self._stalled = None
        self.logger.info("dropped a connection from %s: it read nothing of the answer for %g s "
                         "(--client-timeout)", self.client, self.client_timeout)
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_MALFORMED)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=_MALFORMED), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.client_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.logger.info("closed a connection from %s: no request headers within %g s (--client-timeout)",
                             self.client, self.client_timeout)
            self.transport.close()


def protocol(client_timeout: float) -> type[ClientDeadlines]:
    """The protocol class for a server whose clients get ``client_timeout`` seconds."""
    return type("ClientDeadlines", (ClientDeadlines,), {"client_timeout": client_timeout})


def _path_only(record: logging.LogRecord) -> bool:
    """uvicorn.access records carry (client, method, path?query, http version, status)."""
    if isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, version, status = record.args
        record.args = (client, method, str(path).partition("?")[0], version, status)
    return True


def serve(app: FastAPI, host: str, port: int, client_timeout: float) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, as ``uvicorn.run`` does, with the changes above."""
    config = uvicorn.Config(app, host=host, port=port, log_level="info", ws="none",
                            http=protocol(client_timeout))
    logging.getLogger("uvicorn.access").addFilter(_path_only)  # after Config set logging up
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
