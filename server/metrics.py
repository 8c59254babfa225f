"""Prometheus metrics: requests (answered and in flight), bytes in and out, ratios, restore latency.

Each app has its own registry, so several apps in one process (tests) do not collide.
Requests are labelled by route template (``/v1/runs/{run}``), never by run name, so
the series stay few and ``/metrics`` (unauthenticated, for scrapers) names no run.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("excp_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("excp_http_request_duration_seconds", "Time to answer a request",
                                 ["route"], registry=self.registry)
        self.bytes_in = Counter("excp_http_request_bytes", "Request body bytes received",
                                ["route"], registry=self.registry)
        self.bytes_out = Counter("excp_http_response_bytes", "Response body bytes sent",
                                 ["route"], registry=self.registry)
        self.ratio = Histogram("excp_commit_ratio", "Compression ratio of committed checkpoints "
                               "(fp32 weights + moments over stored bytes)", ["source"],
                               buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128), registry=self.registry)
        self.restore = Histogram("excp_restore_seconds", "Time to have a reconstructed checkpoint "
                                 "ready to stream", ["format", "cache"], registry=self.registry)
        self.in_flight = Gauge("excp_http_requests_in_flight", "Requests received and not yet answered "
                               "(PUT and POST in flight are pushes)", ["method"], registry=self.registry)
        self.cache_bytes = Gauge("excp_restore_cache_bytes", "Bytes held by the restore cache",
                                 registry=self.registry)


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", UNMATCHED)


class MetricsMiddleware:
    """ASGI middleware counting every request, its body bytes and its answer's."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, start, status = self.metrics, time.perf_counter(), 500

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                metrics.bytes_in.labels(route_of(scope)).inc(len(message.get("body", b"")))
            return message

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                metrics.bytes_out.labels(route_of(scope)).inc(len(message.get("body", b"")))
            await send(message)

        try:
            with metrics.in_flight.labels(scope["method"]).track_inprogress():
                await self.app(scope, counted_receive, counted_send)
        finally:
            route = route_of(scope)
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
