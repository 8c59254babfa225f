"""Request limits that answer with the JSON error shape: head size, body size, body pace.

Head. h11 refuses request headers over 16 KiB only while they are incomplete: a head
that arrives whole in one read (asyncio reads up to 256 KiB at a time) passes. So the
URL and headers are measured here as well, and over :data:`MAX_HEAD` is a 431.

Body size. Starlette has a body limiter, but it answers in plain text whenever the declared
length is over the limit, replacing the app's response; clients of this API parse
``{"error": ...}``. So: a declared ``Content-Length`` over the limit is refused before
the app runs (with ``Expect: 100-continue`` the body is never sent); otherwise the
bytes are counted as the app reads them, and once over the limit the app's reads fail
and whatever it answers is replaced by the 413. Uploads (PUT …/archive, POST …/raw)
get the configured limit, every other request the small JSON limit.

Time. uvicorn's only timer is keep-alive, which every byte resets, so a client that
stalls or trickles its body would hold a connection and a half-spooled upload for as
long as it liked. Here a request may keep the app waiting inside ``receive()`` at most
``timeout`` seconds for every :data:`PROGRESS` bytes of body (or its end); time the app
spends elsewhere (spooling to disk, checking the token) is not the client's and is not
counted. A client over that is answered 408 ``request_timeout`` with ``Connection:
close``; the app's read fails, so an upload in flight is discarded and nothing is
committed. (Request headers have their own deadline: :mod:`server.serving`.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from excp.errors import ExcpError, RequestTimeout, TooLarge
from server.errors import error_response

MAX_HEAD = 16 << 10
"""Bytes of URL and headers, h11's own bound for a head that arrives in pieces."""
PROGRESS = 16 << 10
"""Body bytes a client must deliver per ``--client-timeout`` (16 KiB a minute by default)."""


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body over the limit of {limit} bytes: send less, or start the server "
                    "with a larger --max-body")


def _too_slow(timeout: float) -> RequestTimeout:
    return RequestTimeout(f"the request body stalled: less than {PROGRESS} bytes arrived in {timeout:g} s "
                          "(--client-timeout); send it again")


def _answer(failure: ExcpError) -> JSONResponse:
    """The error's JSON answer; after a timeout the connection is closed, not reused."""
    response = error_response(failure.http_status, failure.code, failure.message)
    if isinstance(failure, RequestTimeout):
        response.headers["Connection"] = "close"
    return response


def _head_size(scope: Scope) -> int:
    return (len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
            + sum(len(name) + len(value) for name, value in scope["headers"]))


class RequestLimits:
    """ASGI middleware: at most :data:`MAX_HEAD` bytes of URL and headers, and at most
    ``limit_for(scope)`` body bytes delivered at :data:`PROGRESS` bytes per ``timeout``
    seconds of waiting or faster."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], timeout: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _head_size(scope) > MAX_HEAD:
            message = (f"request URL and headers over {MAX_HEAD} bytes: send a shorter URL and fewer or "
                       "smaller headers")
            await error_response(431, TooLarge.code, message)(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _answer(_too_large(limit))(scope, receive, send)
            return
        seen = progress = 0
        waited = 0.0
        ended = started = False
        failure: ExcpError | None = None

        async def guarded_receive() -> Message:
            nonlocal seen, progress, waited, ended, failure
            if failure is not None:
                raise failure
            if ended:  # after the body only a disconnect can come: wait for it untimed
                return await receive()
            began = time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), self.timeout - waited)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                failure = _too_slow(self.timeout)
                raise failure from None
            waited += time.monotonic() - began
            if message["type"] != "http.request":
                ended = True
                return message
            size = len(message.get("body", b""))
            seen, progress = seen + size, progress + size
            ended = not message.get("more_body", False)
            if progress >= PROGRESS:
                progress, waited = 0, 0.0
            if seen > limit:
                failure = _too_large(limit)
                raise failure
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure is not None:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _answer(failure)(scope, receive, send)
                return  # the app's own answer (e.g. "cannot parse body") is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ExcpError as exc:
            if exc is not failure or started:
                raise
            await _answer(exc)(scope, receive, send)
