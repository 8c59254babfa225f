"""A fault-injecting HTTP proxy between excp's S3 store and moto's S3 server.

moto answers every request correctly and at once; a real object store does not. The
proxy sits on a free port of 127.0.0.1, forwards each request to moto unchanged (the
client's ``Host`` header included, so the request is the one the client signed), and
spoils some answers on the way back, each the way S3 or the network spoils them:

* ``internal_error``, ``slow_down``, ``service_unavailable``: S3's 500 and 503
  answers, with S3's XML error body; the request never reaches moto.
* ``drop_before``: the connection closes without an answer; the request never
  reached moto.
* ``drop_after``: moto did the request, then the connection closes without an
  answer: the write took effect but the writer cannot know (the case a conditional
  PUT's retry must get right).
* ``stall``: moto did the request; the answer is held back longer than the client
  waits (``stall`` seconds), then the connection closes.
* ``stall_body``, ``truncate``: the status and headers (with the full
  ``Content-Length``) and half the body arrive, then the rest never does (held back
  ``stall`` seconds, or the connection closes at once). Only answers with a body can
  be spoiled this way; other answers pass untouched (a scripted fault waits for the
  next matching request).

Which requests fail is chosen by a seeded random plan (``rate`` of the requests, the
kind uniform over ``kinds``), by a scripted queue (:meth:`FaultProxy.inject`, first
match first), or by the outage switch (:meth:`FaultProxy.outage`: every request fails
until :meth:`FaultProxy.restore`). Every fault injected is counted by kind.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from excp import api
from excp.chain import encode_archive
from excp.client.http import commit_of
from excp.codec.params import CodecParams
from tests.s3_fixtures import environment_for, new_bucket, open_moto_store
from tests.serve_fixtures import TEAM_A, Backend, Server

ERRORS = {
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slow_down": (503, "SlowDown", "Please reduce your request rate."),
    "service_unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
}
KINDS = (*ERRORS, "drop_before", "drop_after", "stall", "stall_body", "truncate")
BODY_KINDS = frozenset({"stall_body", "truncate"})
"""The kinds that need an answer with a body to spoil."""
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "expect"})
"""Headers about one connection, not the request: never forwarded (``Expect:
100-continue`` is answered by the proxy itself)."""


@dataclass(frozen=True)
class _Fault:
    kind: str
    counted_as: str  # the kind, or "down" during an outage
    when: re.Pattern[str] | None = None  # a scripted fault's: it waits for an answer it can spoil


class FaultProxy:
    """The proxy in front of ``upstream`` (``http://host:port``); use it as a context
    manager, and point the store at :attr:`url`."""

    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: Iterable[str] = KINDS, seed: int = 0,
                 stall: float = 1.5) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate, self.kinds, self.stall = rate, tuple(kinds), stall
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._random = random.Random(seed)
        self._script: list[_Fault] = []
        self._outage: str | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fault-proxy",
                                        daemon=True)  # polls for shutdown every 0.05 s, not 0.5

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def upstream_url(self) -> str:
        return "http://{}:{}".format(*self.upstream)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, kind: str, times: int = 1, when: str = "") -> None:
        """Spoil the next ``times`` requests whose ``METHOD /path?query`` matches the
        regular expression ``when`` with ``kind``, before the random plan is asked."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; choose from {KINDS}")
        with self._lock:
            self._script += [_Fault(kind, kind, re.compile(when)) for _ in range(times)]

    def pending(self) -> int:
        """Scripted faults not injected yet."""
        with self._lock:
            return len(self._script)

    def outage(self, kind: str = "service_unavailable") -> None:
        """Fail every request with ``kind`` (counted as ``down``) until :meth:`restore`."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; choose from {KINDS}")
        with self._lock:
            self._outage = kind

    def restore(self) -> None:
        with self._lock:
            self._outage = None

    def faults(self) -> int:
        """Faults injected so far, of every kind."""
        with self._lock:
            return sum(self.injected.values())

    def counts(self) -> dict[str, int]:
        """Faults injected by kind (``down``: requests failed by an outage) and requests forwarded."""
        with self._lock:
            return {**dict(sorted(self.injected.items())), "forwarded": self.forwarded}

    # --- used by the handler threads ---------------------------------------------

    def _choose(self, line: str) -> _Fault | None:
        """The fault for this request, if any (not yet counted: it may not apply)."""
        with self._lock:
            if self._outage is not None:
                return _Fault(self._outage, "down")
            for scripted in self._script:
                if scripted.when is not None and scripted.when.search(line):
                    self._script.remove(scripted)
                    return scripted
            if self.kinds and self._random.random() < self.rate:
                kind = self._random.choice(self.kinds)
                return _Fault(kind, kind)
        return None

    def _count(self, fault: _Fault, *, applied: bool) -> None:
        with self._lock:
            if applied:
                self.injected[fault.counted_as] += 1
            elif fault.when is not None:
                self._script.insert(0, fault)

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
                 ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers))
            response = connection.getresponse()
            data = response.read()
            with self._lock:
                self.forwarded += 1
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()


class _Handler(BaseHTTPRequestHandler):
    """One client connection: keep-alive like S3, until a fault closes it."""

    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for botocore's uploads

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._relay()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, *_: object) -> None:
        """Quiet: a campaign makes thousands of requests."""

    def _relay(self) -> None:
        """Forward one request (botocore always sends a Content-Length) and answer it,
        spoiled or not."""
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = proxy._choose(f"{self.command} {self.path}")
        if fault is not None and fault.kind in ERRORS:
            proxy._count(fault, applied=True)
            status, code, message = ERRORS[fault.kind]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
            self._answer(status, [("Content-Type", "application/xml")], xml)
            return
        if fault is not None and fault.kind == "drop_before":
            proxy._count(fault, applied=True)
            self.close_connection = True
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        status, reason, answer_headers, data = proxy._forward(self.command, self.path, headers, body)
        answer_headers = [(k, v) for k, v in answer_headers if k.lower() not in HOP_BY_HOP]
        has_body = len(data) >= 2 and self.command != "HEAD"
        if fault is not None:
            proxy._count(fault, applied=has_body or fault.kind not in BODY_KINDS)
        if fault is None or (fault.kind in BODY_KINDS and not has_body):
            self._answer(status, answer_headers, data, reason)
            return
        self.close_connection = True
        if fault.kind == "drop_after":
            return
        if fault.kind == "stall":
            time.sleep(proxy.stall)
            return
        self._head(status, answer_headers, len(data), reason)
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        if fault.kind == "stall_body":
            time.sleep(proxy.stall)

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, reason: str | None = None
                ) -> None:
        self._head(status, headers, len(data), reason)
        if self.command != "HEAD":
            self.wfile.write(data)

    def _head(self, status: int, headers: list[tuple[str, str]], length: int, reason: str | None) -> None:
        """Status line and headers; a HEAD keeps the object's length, which it has no body to match."""
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() != "content-length" or self.command == "HEAD":
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()


def proxied_backend(proxy: FaultProxy, root: Path, endpoint: str) -> Backend:
    """A fresh bucket on moto at ``endpoint`` as ``excp serve`` sees it through ``proxy``
    (its environment names the proxy's URL), and as the test sees it: directly, so what
    the test reads back meets no fault."""
    bucket = new_bucket(endpoint)
    url = f"s3://{bucket}/team/ckpts"
    env = {k: v for k, v in os.environ.items() if k not in ("EXCP_TOKENS", "EXCP_STORE")}
    return Backend("s3", url, open_moto_store(url, endpoint, root), environment_for(proxy.url, root, env),
                   endpoint=endpoint, bucket=bucket)


def coded_archive(server: Server, run: str, checkpoint: dict, step: int, recon: dict | None
                  ) -> tuple[bytes, dict]:
    """``checkpoint`` coded as ``step`` against the head the service reports (whose
    reconstruction is ``recon``), as a training node does: an upload that needs no
    store access on this side, so an outage reaches only the service."""
    info = server.get(f"/v1/runs/{run}", TEAM_A).json()
    head = commit_of(info["head"]) if info["head"] else None
    out = io.BytesIO()
    _, recon = encode_archive(run, CodecParams.from_dict(info["params"]), head, api.to_bundle(checkpoint),
                              step, out, lambda _: recon)
    return out.getvalue(), recon
