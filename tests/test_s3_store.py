"""What only the S3 store can show, against moto's S3 server over real HTTP. The
contract itself is checked by ``TestStoreContract`` in test_store.py, whose ``store``
fixture uses the fixtures imported here (defined in s3_fixtures.py)."""

from __future__ import annotations

import io
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from excp.errors import InvalidInput, StoreUnavailable
from excp.store import open_store
from excp.store.s3 import MIN_PART_SIZE, S3Store
from tests.s3_fixtures import REGION, admin, moto_api, moto_endpoint, s3_bucket, s3_env

__all__ = ["moto_endpoint", "s3_bucket", "s3_env"]  # the fixtures, for this module and test_store.py


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_large_put_goes_up_in_parts_and_roundtrips(s3_bucket: str, s3_env: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket, multipart_threshold=MIN_PART_SIZE, multipart_chunksize=MIN_PART_SIZE)
    payload = random.Random(1).randbytes(2 * MIN_PART_SIZE + 12345)
    source = tmp_path / "archive.excp"
    source.write_bytes(payload)
    with source.open("rb") as stream:
        store.put("runs/r1/archives/a.excp", stream)
    etag = admin(s3_env).head_object(Bucket=s3_bucket, Key="runs/r1/archives/a.excp")["ETag"]
    assert etag.strip('"').endswith("-3")
    with store.open_read("runs/r1/archives/a.excp") as stream:
        assert stream.read() == payload


def test_unseekable_stream_goes_up_in_full_parts_despite_short_reads(s3_bucket: str, s3_env: str) -> None:
    class Trickle(io.RawIOBase):
        """A pipe-like stream: never seekable, at most 64 KiB per read."""

        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            return self.data.read(min(size, 1 << 16) if size >= 0 else 1 << 16)

    store = S3Store(s3_bucket, multipart_threshold=MIN_PART_SIZE, multipart_chunksize=MIN_PART_SIZE)
    payload = random.Random(2).randbytes(MIN_PART_SIZE + 999)
    store.put("piped", Trickle(payload))
    etag = admin(s3_env).head_object(Bucket=s3_bucket, Key="piped")["ETag"]
    assert etag.strip('"').endswith("-2")
    assert store.get("piped") == payload


@pytest.mark.parametrize("url, bucket, prefix", [
    ("s3://my-bucket", "my-bucket", ""),
    ("s3://my-bucket/", "my-bucket", ""),
    ("s3://my.bucket-1/team/runs/deeper", "my.bucket-1", "team/runs/deeper"),
    ("S3://my-bucket/p/", "my-bucket", "p"),
])
def test_open_store_parses_s3_urls(s3_env: str, url: str, bucket: str, prefix: str) -> None:
    store = open_store(url)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == (bucket, prefix)
    reopened = open_store(store.url)
    assert isinstance(reopened, S3Store)
    assert (reopened.bucket, reopened.prefix) == (bucket, prefix)
    assert store.url == (f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")


@pytest.mark.parametrize("url, problem", [
    ("s3://", "names no bucket"),
    ("s3:///prefix", "names no bucket"),
    ("s3://ab", "invalid S3 bucket name 'ab'"),
    ("s3://My_Bucket/x", "invalid S3 bucket name 'My_Bucket'"),
    ("s3://bucket-/x", "invalid S3 bucket name"),
    ("s3://a..b", "invalid S3 bucket name"),
    ("s3://bucket//x", "unusable S3 store prefix"),
    ("s3://bucket/a b", "unusable S3 store prefix"),
    ("s3://bucket/runs/../x", "unusable S3 store prefix"),
    ("s3://bucket/.tmp-x", "unusable S3 store prefix"),
])
def test_bad_s3_urls_are_invalid_input(s3_env: str, url: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        open_store(url)
    assert problem in caught.value.message
    assert "s3://BUCKET" in caught.value.message
    assert "\n" not in caught.value.message


def test_a_store_url_reopens_the_same_objects(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "team/a")
    store.put("runs/r1/run.json", b"{}")
    assert open_store(store.url).get("runs/r1/run.json") == b"{}"


def test_stores_with_different_prefixes_do_not_see_each_other(s3_bucket: str) -> None:
    first, second, sibling = (S3Store(s3_bucket, prefix) for prefix in ("team/a", "team/b", "team/ab"))
    first.put("runs/r1/run.json", b"first")
    second.put("runs/r1/run.json", b"second")
    assert sibling.put_if_absent("runs/r1/run.json", b"sibling")
    assert first.get("runs/r1/run.json") == b"first"
    assert second.get("runs/r1/run.json") == b"second"
    assert first.list() == ["runs/r1/run.json"]
    assert first.list("runs/") == ["runs/r1/run.json"]
    first.delete("runs/r1/run.json")
    assert second.exists("runs/r1/run.json")
    assert S3Store(s3_bucket).list() == ["team/ab/runs/r1/run.json", "team/b/runs/r1/run.json"]


def test_a_prefix_counts_towards_the_key_length_limit(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "p")
    store.put("a" * 255 + "/" + "b" * 255, b"fits")
    with pytest.raises(InvalidInput, match="shorter prefix"):
        store.put("/".join(["a" * 255, "b" * 255, "c" * 255, "d" * 254, "e"]), b"does not fit")
    assert store.list() == ["a" * 255 + "/" + "b" * 255]


def test_excp_settings_override_the_aws_ones(s3_bucket: str, s3_env: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("EXCP_S3_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("EXCP_S3_REGION", "eu-west-3")
    store = S3Store(s3_bucket)
    assert store.client.meta.region_name == "eu-west-3"
    assert store.client.meta.endpoint_url == s3_env
    store.put("k", b"v")
    assert admin(s3_env).get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"


def test_aws_settings_are_used_without_excp_ones(s3_bucket: str, s3_env: str) -> None:
    store = S3Store(s3_bucket)
    assert store.client.meta.region_name == REGION
    assert store.client.meta.endpoint_url == s3_env
    store.put("k", b"v")
    assert store.get("k") == b"v"


def test_a_bad_endpoint_setting_is_invalid_input(s3_env: str, monkeypatch) -> None:
    monkeypatch.setenv("EXCP_S3_ENDPOINT_URL", "localhost 9000")
    with pytest.raises(InvalidInput, match="EXCP_S3_ENDPOINT_URL"):
        S3Store("my-bucket")


def test_an_unreachable_endpoint_is_store_unavailable_quickly(s3_env: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = S3Store("my-bucket", endpoint_url=endpoint, max_attempts=1, connect_timeout=1, read_timeout=1)
    started = time.monotonic()
    for operation in (lambda: store.get("k"), lambda: store.put("k", b"v"), store.list,
                      lambda: store.exists("k"), lambda: store.put_if_absent("k", b"v")):
        with pytest.raises(StoreUnavailable) as caught:
            operation()
        assert endpoint in caught.value.message
        assert "my-bucket" in caught.value.message
        assert "\n" not in caught.value.message
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("operation", [
    lambda s: s.get("k"),
    lambda s: s.open_read("k"),
    lambda s: s.put("k", b"v"),
    lambda s: s.put_if_absent("k", b"v"),
    lambda s: s.exists("k"),
    lambda s: s.size("k"),
    lambda s: s.list(),
    lambda s: s.delete("k"),
], ids=["get", "open_read", "put", "put_if_absent", "exists", "size", "list", "delete"])
def test_a_missing_bucket_is_store_unavailable(s3_env: str, operation) -> None:
    store = S3Store("excp-no-such-bucket")
    with pytest.raises(StoreUnavailable) as caught:
        operation(store)
    assert "'excp-no-such-bucket' does not exist" in caught.value.message
    assert "create it" in caught.value.message


def test_unknown_credentials_are_store_unavailable(s3_bucket: str, s3_env: str) -> None:
    store = S3Store(s3_bucket)
    moto_api(s3_env, "reset-auth", b"0")  # from now on moto checks every request's credentials
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.put("k", b"v")
    finally:
        moto_api(s3_env, "reset-auth", b"inf")
    assert "InvalidAccessKeyId" in caught.value.message
    assert "check the credentials" in caught.value.message
    assert s3_bucket in caught.value.message


def test_a_retried_commit_that_already_landed_is_still_a_win(s3_bucket: str, monkeypatch) -> None:
    """botocore retries a PUT whose answer was lost; the retry then meets our own write."""
    store = S3Store(s3_bucket)
    monkeypatch.setattr("excp.store.s3.token_hex", lambda _: "this-call")
    real_put = store.client.put_object

    def answer_lost(**kwargs: Any) -> Any:
        real_put(**kwargs)
        return real_put(**kwargs)  # the retry: 412, as the first try created the key

    monkeypatch.setattr(store.client, "put_object", answer_lost)
    assert store.put_if_absent("commit", b"mine") is True
    monkeypatch.setattr("excp.store.s3.token_hex", lambda _: "another-call")
    assert store.put_if_absent("commit", b"theirs") is False
    assert store.get("commit") == b"mine"


@pytest.mark.parametrize("then_exists, expected", [(False, True), (True, False)])
def test_a_conditional_write_in_flight_is_waited_for(s3_bucket: str, monkeypatch, then_exists: bool,
                                                     expected: bool) -> None:
    store = S3Store(s3_bucket)
    real_put = store.client.put_object
    calls = []

    def conflict_once(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        if len(calls) == 1:
            if then_exists:
                real_put(Bucket=s3_bucket, Key="commit", Body=b"other writer")
            raise ClientError({"Error": {"Code": "ConditionalRequestConflict"},
                               "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(store.client, "put_object", conflict_once)
    assert store.put_if_absent("commit", b"mine") is expected
    assert calls == ["commit", "commit"]
    assert store.get("commit") == (b"mine" if expected else b"other writer")


def test_a_server_error_is_store_unavailable(s3_bucket: str, monkeypatch) -> None:
    store = S3Store(s3_bucket)

    def broken(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject")

    monkeypatch.setattr(store.client, "get_object", broken)
    with pytest.raises(StoreUnavailable) as caught:
        store.get("k")
    assert "InternalError" in caught.value.message
    assert s3_bucket in caught.value.message
