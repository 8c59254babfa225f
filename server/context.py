"""What every route needs: the services of the app, who is asking, and checked names."""

from __future__ import annotations

import asyncio
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import Depends, Request
from fastapi import Path as InPath
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from excp.chain import MAX_STEP, RUN_NAME, RUN_NAME_RULE, validate_run
from excp.errors import InvalidInput, Unauthorized
from excp.place import Place
from excp.store import Store
from server.auth import Principal, TokenTable
from server.config import ServeConfig
from server.metrics import Metrics
from server.restore_cache import RestoreCache
from server.workers import Workers

_STEP = re.compile(r"[0-9]{1,12}")
_FLUSH = 1 << 20


class RunLocks:
    """One asyncio lock per run name, alive while someone holds or waits for it.

    Everything that changes a run (commit, delete) takes its lock, so within this
    server a delete can never interleave with a push to the same run. Different runs
    never wait for each other; two servers on one store still rely on the store's
    put_if_absent for racing commits.
    """

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, run: str) -> asyncio.Lock:
        lock = self._locks.get(run)
        if lock is None:
            lock = self._locks[run] = asyncio.Lock()
        return lock


@dataclass
class Services:
    config: ServeConfig
    store: Store
    tokens: TokenTable
    workers: Workers
    cache: RestoreCache
    metrics: Metrics
    spool: Path
    locks: RunLocks


async def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


async def here(request: Request) -> Place:
    """How messages name this service: by the URL the client reached it at (the store
    behind it is a path on this machine, which means nothing to a client)."""
    return Place.service(str(request.base_url).rstrip("/"))


Here = Annotated[Place, Depends(here)]
_bearer = HTTPBearer(auto_error=False, description="A token from the server's tokens file")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def principal(request: Request, credentials: Bearer, svc: Svc) -> Principal:
    """The caller (async: no blocking work, so no thread hop). A malformed Authorization
    header is refused rather than treated as none, so a typo never makes a client
    anonymous."""
    if credentials is None and "authorization" in request.headers:
        raise Unauthorized("malformed Authorization header: send Authorization: Bearer <token>")
    return svc.tokens.authenticate(credentials.credentials if credentials else None)


Caller = Annotated[Principal, Depends(principal)]


# Path parameters are plain strings checked by run_name and step_number, so that a bad
# one gets their one-line message rather than pydantic's; the patterns only say in the
# OpenAPI what those functions accept (and let a schema fuzzer generate valid ones).
RunPath = Annotated[str, InPath(description=RUN_NAME_RULE,
                                json_schema_extra={"pattern": f"^{RUN_NAME.pattern}$"})]
StepPath = Annotated[str, InPath(description=f"An integer from 0 to {MAX_STEP}",
                                 json_schema_extra={"pattern": "^[0-9]{1,12}$"})]
StepOrLatestPath = Annotated[str, InPath(description=f"An integer from 0 to {MAX_STEP}, or latest",
                                         json_schema_extra={"pattern": "^([0-9]{1,12}|latest)$"})]


def run_name(run: str) -> str:
    return validate_run(run)


def step_number(step: str) -> int:
    """A step in a URL: decimal digits only (no sign, exponent, spaces or ``latest``)."""
    if not _STEP.fullmatch(step) or int(step) > MAX_STEP:
        raise InvalidInput(f"invalid step {step!r}: use an integer from 0 to {MAX_STEP}")
    return int(step)


def step_or_latest(step: str) -> int | str:
    return "latest" if step == "latest" else step_number(step)


async def spool_body(request: Request, into: BinaryIO) -> int:
    """Copy the request body into ``into`` as it arrives, a megabyte at a time on a
    thread: a body is never whole in memory and the event loop never waits on a disk."""
    pending, total = bytearray(), 0
    try:
        async for chunk in request.stream():
            pending += chunk
            total += len(chunk)
            if len(pending) >= _FLUSH:
                data, pending = pending, bytearray()
                await run_in_threadpool(into.write, data)
    except ClientDisconnect:
        raise InvalidInput("the client went away before the upload ended; upload again") from None
    if pending:
        await run_in_threadpool(into.write, pending)
    await run_in_threadpool(into.flush)
    if total == 0:
        raise InvalidInput("empty request body: send the file as the body")
    return total
