"""A store in an S3 bucket (AWS, MinIO, Ceph, moto, ...), one object per key.

Where the bucket lives comes from the usual AWS settings, which boto3 reads itself:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config files. Two variables
override them for excp alone, so its store can sit elsewhere than the rest of a job's
AWS traffic:

* ``EXCP_S3_ENDPOINT_URL``: the S3 endpoint, e.g. ``http://localhost:9000`` for MinIO.
  An endpoint named this way (or passed as ``endpoint_url``) is addressed path-style
  (``host/bucket/key``), which every S3-compatible server accepts.
* ``EXCP_S3_REGION``: the region to sign requests for.

The contract's promises map onto S3 as follows. ``put`` is atomic because S3 exposes
an object only once its (multipart) upload completes. ``put_if_absent`` is a
conditional write (``If-None-Match: *``), which S3 lets exactly one writer win.
``open_read`` copies the object aside while reading it in one GET, which S3 serves
from a single version even if the key is replaced meanwhile. S3 has no directories,
so the rule that ``a`` and ``a/b`` cannot both exist is kept by looking before
writing; unlike the other promises, that check is not atomic with the write.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from secrets import token_hex
from typing import Any, BinaryIO, TypeVar

import botocore.loaders
import botocore.session
import tenacity
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from excp.errors import InvalidInput, StoreUnavailable
from excp.store.base import MAX_KEY_LENGTH, Store, is_key, validate_key, validate_prefix

MIN_PART_SIZE = 5 << 20
"""S3 refuses multipart parts below 5 MiB (except the last)."""

_CHUNK = 1 << 20
_IN_MEMORY = 8 << 20
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "AllAccessDisabled"})
_WRITER = "excp-writer"
_CONFLICT_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8)
_BODY_BACKOFF = 0.5
"""Seconds: the first repeat of a GET whose body was cut off waits up to this long, each
later one up to twice as long as the one before (full jitter, as botocore's own)."""
_API_MODELS = botocore.loaders.create_loader()
"""Parsed API descriptions, shared by every store's session: parsing them is most of
the cost of opening a store (0.1 s or more), and they never change."""
T = TypeVar("T")


class S3Store(Store):
    """Keys map to objects ``PREFIX/key`` in ``bucket`` (just ``key`` without a prefix).

    Safe for any number of threads and processes on any machines sharing the bucket.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, multipart_threshold: int = 16 << 20,
                 multipart_chunksize: int = 16 << 20, max_attempts: int = 5,
                 connect_timeout: float = 5.0, read_timeout: float = 20.0) -> None:
        """``max_attempts`` counts every try of a request; botocore retries throttling,
        5xx answers, dropped connections and timeouts with backoff between them, and a
        GET whose body breaks off midway is repeated whole as many times.
        ``read_timeout`` is the longest silence of a socket, not of a transfer: 20 s
        lets an endpoint that accepts requests and never answers fail a request in about
        2 minutes of tries (with 60 s, a service push waited 5, longer than a client's
        timeout) while a slow large transfer, which keeps sending, is never cut.

        Uploads of at least ``multipart_threshold`` bytes go up in parts of
        ``multipart_chunksize`` (both at least 5 MiB, S3's smallest part), so a file is
        never read whole and a dropped connection costs one part, not the archive.
        """
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise InvalidInput(
                f"invalid S3 bucket name {bucket!r}: 3-63 characters of a-z 0-9 . -, starting and "
                "ending with a letter or digit; write the store as s3://BUCKET or s3://BUCKET/PREFIX"
            )
        prefix = prefix.rstrip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidInput as err:
                raise InvalidInput(
                    f"unusable S3 store prefix: {err.message}; write the store as s3://BUCKET/PREFIX with "
                    "PREFIX made of A-Z a-z 0-9 . _ = - segments joined by '/'"
                ) from None
        if min(multipart_threshold, multipart_chunksize) < MIN_PART_SIZE:
            raise InvalidInput(f"S3 multipart threshold and chunk size are at least {MIN_PART_SIZE} bytes")
        self.bucket = bucket
        self.prefix = prefix
        self._attempts = max_attempts
        endpoint_url = endpoint_url or os.environ.get("EXCP_S3_ENDPOINT_URL") or None
        region = region or os.environ.get("EXCP_S3_REGION") or None
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # Non-AWS servers reject or miscompute the newer default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        # A session per store reads credentials and config afresh; only the models are shared.
        session = botocore.session.get_session()
        session.register_component("data_loader", _API_MODELS)
        try:
            self.client: Any = session.create_client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except (ValueError, BotoCoreError) as err:
            raise InvalidInput(
                f"cannot use S3 endpoint {endpoint_url!r} / region {region!r}: {_one_line(err)}; "
                "set EXCP_S3_ENDPOINT_URL to a URL like http://host:9000 and EXCP_S3_REGION to a region name"
            ) from None
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_chunksize, max_concurrency=4,
                                        preferred_transfer_client="classic")
        self._bucket_seen = False

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def get(self, key: str) -> bytes:
        return self._read(key, lambda body, _: body.read())

    def open_read(self, key: str) -> BinaryIO:
        """The value is copied aside (in memory if small, else to a temp file) by one
        GET, so later reads cannot see a newer value and need no connection."""
        return self._read(key, _copy_aside)

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        name = self._name(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = io.BytesIO(data)
        elif not (hasattr(data, "seekable") and data.seekable()):
            data = _FullReads(data)
        self._refuse_nesting(key)
        # What boto3's upload_fileobj does, on a client made without a boto3 session.
        with self._calling(f"writing {key!r}"):
            with create_transfer_manager(self.client, self._transfer) as transfer:
                transfer.upload(data, self.bucket, name).result()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        name = self._name(key)
        body = bytes(data)
        self._refuse_nesting(key)
        token = token_hex(16)
        for delay in (0.0, *_CONFLICT_BACKOFF):
            time.sleep(delay)
            created = self._create(key, name, body, token)
            if created is not None:
                return created
        raise StoreUnavailable(
            f"S3 bucket {self.bucket!r} at {self.client.meta.endpoint_url} kept answering 409 "
            f"ConditionalRequestConflict while committing {key!r}; another writer is stuck, retry later"
        )

    def exists(self, key: str) -> bool:
        return self._head(self._name(key)) is not None

    def size(self, key: str) -> int:
        head = self._head(self._name(key))
        if head is None:
            raise self._not_found(key)
        return head["ContentLength"]

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + validate_prefix(prefix)
        )
        with self._calling(f"listing {prefix!r}"):
            names = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
        return sorted(key for key in (name[len(base):] for name in names) if is_key(key))

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._calling(f"deleting {key!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=name)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _name(self, key: str) -> str:
        name = self._full(validate_key(key))
        if len(name) > MAX_KEY_LENGTH:
            raise InvalidInput(f"invalid store key {key!r}: with the store prefix {self.prefix!r} it is "
                               f"longer than S3's {MAX_KEY_LENGTH} bytes; use a shorter prefix")
        return name

    def _create(self, key: str, name: str, body: bytes, token: str) -> bool | None:
        """One conditional PUT: True if it created ``name``, False if another writer
        had, None if another conditional write of it is in flight (409), whose outcome
        decides. The token marks this call, so a 412 caused by botocore retrying our own
        PUT whose answer was lost still counts as our win."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*",
                                   Metadata={_WRITER: token})
            return True
        except ClientError as err:
            if _status(err) == 412:
                head = self._head(name)
                return head is not None and head.get("Metadata", {}).get(_WRITER) == token
            if _status(err) == 409:
                return None
            raise self._unavailable(err, f"committing {key!r}") from err
        except BotoCoreError as err:
            raise self._unavailable(err, f"committing {key!r}") from err

    def _read(self, key: str, take: Callable[[Any, int], T]) -> T:
        """``take(body, length)`` of one GET of ``key``, repeated whole if its body is cut
        off. botocore retries a GET until its headers arrive; a body that breaks off after
        them (a dropped connection, a stall past the read timeout) is the reader's to
        retry, with backoff, up to ``max_attempts`` times. So is an error answer (404,
        503) whose body breaks off: botocore reads it outside its retries, and lets
        urllib3's exception through unwrapped."""
        name = self._name(key)

        def attempt() -> T:
            try:
                with self._calling(f"reading {key!r}", key):
                    response = self.client.get_object(Bucket=self.bucket, Key=name)
                with closing(response["Body"]) as body:
                    return take(body, response["ContentLength"])
            except (BotoCoreError, urllib3.exceptions.HTTPError) as err:
                raise _BodyLost(err) from err

        retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(_BodyLost),
                                     stop=tenacity.stop_after_attempt(self._attempts),
                                     wait=tenacity.wait_random_exponential(_BODY_BACKOFF, max=20),
                                     reraise=True)
        try:
            return retrying(attempt)
        except _BodyLost as lost:
            raise StoreUnavailable(
                f"S3 bucket {self.bucket!r} at {self.client.meta.endpoint_url} cut off its answer to reading "
                f"{key!r} midway {self._attempts} times in a row ({_one_line(lost.error)}); check the "
                "network to the endpoint, then retry"
            ) from lost.error

    def _head(self, name: str) -> dict[str, Any] | None:
        """The object's metadata, or None if there is no object ``name``."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as err:
            if _code(err) not in _MISSING:
                raise self._unavailable(err, f"looking up {name!r}") from err
        except BotoCoreError as err:
            raise self._unavailable(err, f"looking up {name!r}") from err
        self._check_bucket()
        return None

    def _check_bucket(self) -> None:
        """A HEAD answers a bare 404 for a missing key and a missing bucket alike; tell
        them apart once, so a mistyped bucket is not silently an empty store."""
        if self._bucket_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if _code(err) in _MISSING or _code(err) == "NoSuchBucket":
                raise self._no_bucket() from err
            raise self._unavailable(err, "checking the bucket") from err
        except BotoCoreError as err:
            raise self._unavailable(err, "checking the bucket") from err
        self._bucket_seen = True

    def _refuse_nesting(self, key: str) -> None:
        """Raise Conflict if ``key`` would sit beneath a key or above one. Best effort: a
        writer of ``a/b`` racing a writer of ``a`` can slip past this check."""
        segments = key.split("/")
        for end in range(1, len(segments)):
            if self._head(self._full("/".join(segments[:end]))) is not None:
                raise self._nested(key)
        with self._calling(f"writing {key!r}"):
            below = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._full(key) + "/", MaxKeys=1)
        if below.get("KeyCount", 0):
            raise self._nested(key)

    @contextmanager
    def _calling(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore's errors into excp's; ``key`` makes a missing object NotFound."""
        try:
            yield
        except ClientError as err:
            if key is not None and _code(err) in _MISSING:
                raise self._not_found(key) from err
            raise self._unavailable(err, action) from err
        except BotoCoreError as err:
            raise self._unavailable(err, action) from err

    def _unavailable(self, err: Exception, action: str) -> StoreUnavailable:
        where = f"S3 bucket {self.bucket!r} at {self.client.meta.endpoint_url}"
        if isinstance(err, ClientError):
            code = _code(err)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in _DENIED or _status(err) == 403:
                return StoreUnavailable(
                    f"{where} refused {action} ({code}); check the credentials (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may get, put, delete and list "
                    "objects in the bucket"
                )
            return StoreUnavailable(f"{where} failed {action}: {_one_line(err)}; check the endpoint and "
                                    "the bucket, then retry")
        if isinstance(err, NoCredentialsError):
            return StoreUnavailable(f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        return StoreUnavailable(f"cannot reach {where} while {action}: {_one_line(err)}; check "
                                "EXCP_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network")

    def _no_bucket(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"S3 bucket {self.bucket!r} does not exist at {self.client.meta.endpoint_url}; create it "
            f"(e.g. `aws s3 mb s3://{self.bucket}`) or fix the bucket in the store URL"
        )


class _BodyLost(Exception):
    """A GET's answer broke off after its headers: the GET is worth repeating whole."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _copy_aside(body: Any, length: int) -> BinaryIO:
    """The whole of ``body``: in memory if small, else in a temp file (the caller closes it)."""
    if length <= _IN_MEMORY:
        return io.BytesIO(body.read())
    copy = tempfile.TemporaryFile()
    try:
        shutil.copyfileobj(body, copy, _CHUNK)
        copy.seek(0)
    except BaseException:
        copy.close()
        raise
    return copy


class _FullReads:
    """A stream whose ``read(n)`` returns ``n`` bytes unless the data ends.

    s3transfer takes a short read from a stream that cannot seek (a pipe, a socket) for
    its end: it would then read the rest in one call, or send a part below S3's 5 MiB
    minimum. Reading until ``n`` bytes or end of data keeps every read bounded.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # s3transfer asks this only after a short read, at the end
            return b"".join(iter(lambda: self._stream.read(_CHUNK), b""))
        chunks = []
        while size > 0 and (chunk := self._stream.read(size)):
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int | None:
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


