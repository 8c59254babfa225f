"""``create_app(config)``: the FastAPI application of ``excp serve``.

One uvicorn process serves everything: requests are async, store calls run on
Starlette's thread pool, and tensor work (compressing raw uploads, reconstructing
checkpoints) runs in a pool of worker processes (:mod:`server.workers`), so a long
restore never holds up other requests.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI
from starlette.types import Scope

from excp.store import open_store
from server import errors, routes_checkpoints, routes_health, routes_runs
from server.config import MAX_JSON_BODY, ServeConfig
from server.context import RunLocks, Services
from server.limits import RequestLimits
from server.metrics import Metrics, MetricsMiddleware
from server.restore_cache import RestoreCache
from server.workers import Workers

DESCRIPTION = """Checkpoint compression as a service: runs are chains of compressed checkpoints
in a store. Errors are `{"error": {"code", "message"}}`. Authenticate with
`Authorization: Bearer <token>`."""


def _is_upload(scope: Scope) -> bool:
    path, method = scope["path"], scope["method"]
    return ((method == "PUT" and path.endswith(("/archive", "/exact")))
            or (method == "POST" and path.endswith("/raw")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spool_dir(root: Path) -> Path:
    """This server's directory for uploads in flight, named ``<host>-<pid>-<random>``.

    Directories this host's dead servers left (a SIGKILL does) are removed first; in a
    restarted container the old server had this very pid, so that counts as dead too.
    Other hosts' directories (a shared cache volume) are left alone.
    """
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in root.iterdir():
        owner, _, rest = old.name.rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else None
        if owner == host and pid is not None and (pid == os.getpid() or not _alive(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-", dir=root))


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The app for ``config``; the store is opened (and a bad URL refused) here, before
    anything listens."""
    config = config or ServeConfig()
    store = open_store(config.store)
    metrics = Metrics()
    cache = RestoreCache(config.cache_dir / "restore", config.cache_bytes)
    metrics.cache_bytes.set_function(cache.size)
    svc = Services(config=config, store=store, tokens=config.tokens,
                   workers=Workers(store, config.workers, str(config.cache_dir / "push")),
                   cache=cache, metrics=metrics, spool=_spool_dir(config.cache_dir / "spool"),
                   locks=RunLocks())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            svc.workers.shutdown()
            shutil.rmtree(svc.spool, ignore_errors=True)

    # No redirects for a trailing slash: an API answers its documented paths, anything
    # else is a JSON 404 rather than a 307 a client would follow with its token.
    app = FastAPI(title="excp", version=version("excp"), description=DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.services = svc
    errors.install(app)
    app.include_router(routes_health.router)
    app.include_router(routes_runs.router)
    app.include_router(routes_checkpoints.router)
    app.add_middleware(RequestLimits, timeout=config.client_timeout,
                       limit_for=lambda scope: config.max_body if _is_upload(scope) else MAX_JSON_BODY)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
