"""Probes and metrics, outside /v1 and without auth (for orchestrators and scrapers)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from excp.errors import StoreUnavailable
from server.context import Svc
from server.errors import error_response

router = APIRouter(tags=["health"])

PROBE_KEY = "readyz-probe"
"""A key no run can have (run keys start with ``runs/``); only its absence is read."""
PROBE_TIMEOUT = 10.0


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers", responses={503: {"description": "store_unavailable"}})
async def readyz(svc: Svc) -> Response:
    try:
        await asyncio.wait_for(run_in_threadpool(svc.store.exists, PROBE_KEY), PROBE_TIMEOUT)
    except StoreUnavailable as err:
        return error_response(503, err.code, err.message)
    except asyncio.TimeoutError:
        return error_response(503, StoreUnavailable.code,
                              f"store {svc.store.url} did not answer within {PROBE_TIMEOUT:.0f} s; check it")
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(svc: Svc) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
