"""Every failure a client sees is ``{"error": {"code", "message"}}`` with a stable code.

excp's own errors (:mod:`excp.errors`) carry a code and an HTTP status, including the
few that only exist over HTTP (401, 403, 413): they live there too, so that the client
maps a code back to the same class. One handler answers for all of them. Anything
unexpected is answered as a bare 500; Starlette re-raises it after answering, so the
server (uvicorn) logs the traceback and a client never sees it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from excp.errors import ExcpError

log = logging.getLogger("excp.server")


_HTTP_CODES = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "invalid_input",
               503: "store_unavailable"}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming the first bad field: what FastAPI knows, without echoing input."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON; see /docs for the schema"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return f"invalid {where}: {first.get('msg', 'malformed request')}; see /docs for the schema"


def install(app: FastAPI) -> None:
    """Route every exception through the one JSON error shape."""

    @app.exception_handler(ExcpError)
    async def _excp(_: Request, exc: ExcpError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return error_response(exc.http_status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_input", _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, __: Exception) -> JSONResponse:
        return error_response(500, "internal", "internal server error; the server log has the details")
