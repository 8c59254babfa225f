"""moto's S3 server for the tests, over real HTTP: the fixtures that test_s3_store.py,
test_store.py and test_server.py share, and helpers to reach the server.

A module that wants the fixtures imports them (``from tests.s3_fixtures import
moto_endpoint, s3_bucket, s3_env``); pytest then gives that module its own session-wide
moto server.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.s3.responses import S3Response
from moto.server import ThreadedMotoServer

from excp.store import Store, open_store

REGION = "us-east-1"
AWS_SETTINGS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "EXCP_S3_ENDPOINT_URL", "EXCP_S3_REGION")
"""Every variable that can say where S3 is or who is asking: none of the caller's may leak
into a test, which must never reach a real account."""


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free local port (its endpoint URL), over real HTTP.

    moto checks ``If-None-Match: *`` and then writes without a lock, so two racing
    conditional PUTs can both succeed (seen with a short thread switch interval).
    Real S3 decides them atomically; the lock makes moto do the same, so the race tests
    check our use of the condition rather than moto's timing. The lock lives in the
    process that runs the moto server (a test's, or a benchmark script's): clients in
    other processes, such as an ``excp serve`` subprocess and its workers, are decided
    by it too.
    """
    lock = threading.Lock()
    unlocked = S3Response.put_object

    def put_object_atomically(self: S3Response) -> object:
        with lock:
            return unlocked(self)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a log line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    S3Response.put_object = put_object_atomically
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        S3Response.put_object = unlocked


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto S3 server for the whole session."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Point the standard AWS settings at moto for one test, away from any real account,
    and empty moto afterwards so big test objects do not pile up."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3",
                 "EXCP_S3_ENDPOINT_URL", "EXCP_S3_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    yield moto_endpoint
    moto_api(moto_endpoint, "reset")


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new, empty bucket, so every test starts from nothing."""
    return new_bucket(s3_env)


def admin(endpoint: str) -> Any:
    """A plain boto3 client, to look at the bucket behind the store's back."""
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def new_bucket(endpoint: str) -> str:
    bucket = f"excp-test-{uuid.uuid4().hex[:16]}"
    admin(endpoint).create_bucket(Bucket=bucket)
    return bucket


def moto_api(endpoint: str, action: str, data: bytes = b"") -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/{action}", data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).close()


def moto_settings(endpoint: str, nowhere: Path) -> dict[str, str]:
    """The variables that send excp (alone) to moto at ``endpoint``; ``nowhere`` is a
    directory whose absent files stand in for the AWS config files."""
    return {"EXCP_S3_ENDPOINT_URL": endpoint, "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_CONFIG_FILE": str(nowhere / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(nowhere / "no-aws-credentials")}


def environment_for(endpoint: str, nowhere: Path, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` (e.g. ``os.environ``) with every AWS setting replaced by
    :func:`moto_settings`: the environment of a subprocess that talks to moto."""
    env = {k: v for k, v in base.items() if k not in AWS_SETTINGS}
    env.update(moto_settings(endpoint, nowhere))
    return env


def open_moto_store(url: str, endpoint: str, nowhere: Path) -> Store:
    """``open_store(url)`` for an ``s3://`` URL on moto, without changing this process's
    environment for longer than the call: the client reads its endpoint, region and
    credentials when it is made."""
    with pytest.MonkeyPatch.context() as patch:
        for name in AWS_SETTINGS:
            patch.delenv(name, raising=False)
        for name, value in moto_settings(endpoint, nowhere).items():
            patch.setenv(name, value)
        return open_store(url)
