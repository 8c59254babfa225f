"""Request body limits that answer with the JSON error shape.

Starlette has a body limiter, but it answers in plain text whenever the declared
length is over the limit, replacing the app's response; clients of this API parse
``{"error": ...}``. So: a declared ``Content-Length`` over the limit is refused before
the app runs (with ``Expect: 100-continue`` the body is never sent); otherwise the
bytes are counted as the app reads them, and once over the limit the app's reads fail
and whatever it answers is replaced by the 413. Uploads (PUT …/archive, POST …/raw)
get the configured limit, every other request the small JSON limit.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from excp.errors import TooLarge
from server.errors import error_response


def _message(limit: int) -> str:
    return (f"request body over the limit of {limit} bytes: send less, or start the server "
            "with a larger --max-body")


class BodyLimit:
    """ASGI middleware: at most ``limit_for(scope)`` body bytes per request."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error_response(413, TooLarge.code, _message(limit))(scope, receive, send)
            return
        seen = 0
        exceeded = started = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise TooLarge(_message(limit))
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await error_response(413, TooLarge.code, _message(limit))(scope, receive, send)
                return  # the app's own answer (e.g. "cannot parse body") is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except TooLarge:
            if started:
                raise
            await error_response(413, TooLarge.code, _message(limit))(scope, receive, send)
