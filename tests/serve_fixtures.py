"""A real ``excp serve`` on 127.0.0.1 for the tests, on a directory store or on moto's
S3 server: the harness that test_server.py and the client tests share.

The service runs in a subprocess, as users run it; tokens cover every scope (admin,
write and read over the ``team-a-`` prefix, write over ``team-b-``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from excp.store import LocalStore, Store
from tests.s3_fixtures import environment_for, new_bucket, open_moto_store

ADMIN = "admin-token-0123456789abcdef"
TEAM_A = "team-a-token-0123456789abcdef"
READER_A = "reader-a-token-0123456789abcdef"
TEAM_B = "team-b-token-0123456789abcdef"
TOKENS = {"tokens": [
    {"name": "admin", "token": ADMIN, "scopes": ["admin"], "prefixes": [""]},
    {"name": "team-a", "token": TEAM_A, "scopes": ["write"], "prefixes": ["team-a-"]},
    {"name": "reader-a", "token": READER_A, "scopes": ["read"], "prefixes": ["team-a-"]},
    {"name": "team-b", "token": TEAM_B, "scopes": ["write"], "prefixes": ["team-b-"]},
]}
MAX_BODY = 2 << 20
ARCHIVE_ROUTE = "/v1/runs/{run}/checkpoints/{step}/archive"
DEADLINE = 90.0
STORES = ("local", "s3")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Backend:
    """A store as the service sees it (its URL and the environment of ``excp serve``)
    and as the test sees it (a store object for ``excp.api`` and for looking around)."""

    kind: str
    url: str
    store: Store
    env: dict[str, str]
    directory: Path | None = None  # the local store's directory
    endpoint: str | None = None  # moto's, for an S3 store
    bucket: str | None = None


def new_backend(kind: str, root: Path, request: pytest.FixtureRequest) -> Backend:
    """A new, empty store of ``kind``: a directory under ``root``, or a fresh bucket on
    moto's S3 server (under a prefix, as a shared bucket would be used). The service
    reaches moto through excp's own variables, set in its environment only."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXCP_TOKENS", "EXCP_STORE")}
    if kind == "local":
        return Backend(kind, str(root / "store"), LocalStore(root / "store"), env, directory=root / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = new_bucket(endpoint)
    url = f"s3://{bucket}/team/ckpts"
    return Backend(kind, url, open_moto_store(url, endpoint, root), environment_for(endpoint, root, env),
                   endpoint=endpoint, bucket=bucket)


class Server:
    """``excp serve`` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, root: Path, backend: Backend, max_body: int = MAX_BODY,
                 tokens: dict[str, Any] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``tokens`` replaces the tokens file's content (default :data:`TOKENS`);
        ``extra_args`` are appended to ``excp serve``'s command line."""
        self.root, self.backend, self.max_body = root, backend, max_body
        self.store = backend.store
        self.tokens = root / "tokens.json"
        self.tokens.write_text(json.dumps(TOKENS if tokens is None else tokens))
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> Server:
        """Start on ``port`` (a restart on the same address), else on a free one."""
        self.port = port or free_port()
        env = {**self.backend.env, "EXCP_CACHE": str(self.root / "excp-cache")}
        self.log = open(self.root / f"server-{self.port}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from excp.cli import main; main()", "serve", "--store", self.backend.url,
             "--port", str(self.port), "--tokens", str(self.tokens), "--cache-dir", str(self.root / "cache"),
             "--cache-size", "1MiB", "--max-body", str(self.max_body), "--workers", "2",
             "--allow-factory", "tests.factories:mlp", *self.extra_args],
            cwd=Path(__file__).parent.parent, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"excp serve exited: {self.output()}"
            try:
                if requests.get(self.url("/healthz"), timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not listening, or slow to answer
                time.sleep(0.1)
        raise AssertionError(f"excp serve did not answer /healthz: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.root / f"server-{self.port}.log").read_text(errors="replace")[-3000:]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    # --- the API, as a client uses it -----------------------------------------

    def get(self, path: str, token: str = ADMIN, **kwargs: Any) -> requests.Response:
        return requests.get(self.url(path), headers=auth(token), timeout=120, **kwargs)

    def create(self, run: str, token: str = TEAM_A, **body: Any) -> requests.Response:
        return requests.post(self.url("/v1/runs"), json={"name": run, **body}, headers=auth(token),
                             timeout=60)

    def put_archive(self, run: str, step: int, body: Any, token: str = TEAM_A) -> requests.Response:
        return requests.put(self.url(f"/v1/runs/{run}/checkpoints/{step}/archive"), data=body,
                            headers=auth(token), timeout=120)

    def delete(self, path: str, token: str = ADMIN) -> requests.Response:
        return requests.delete(self.url(path), headers=auth(token), timeout=60)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = requests.get(self.url("/metrics"), timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
