"""The Store contract, checked identically against every backend (S3 on moto's server,
with fixtures from test_s3_store.py), plus what only the directory store and
``open_store`` can show."""

from __future__ import annotations

import io
import os
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from excp.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from excp.store import LocalStore, MemoryStore, Store, open_store, validate_key
from excp.store.s3 import S3Store
from tests.test_s3_store import moto_endpoint, s3_bucket, s3_env  # noqa: F401 (fixtures)

COMMIT = "runs/r1/commits/000000000100.json"
LONGEST_KEY = "/".join(["a" * 255, "b" * 255, "c" * 255, "d" * 254, "e"])
INVALID_KEYS = [
    "",
    "/runs/r1",
    "runs/r1/",
    "runs//r1",
    "runs/../r1",
    "..",
    "runs/./r1",
    "runs/r\x001",
    "runs/r 1",
    "runs/r1\n",
    "runs\\r1",
    "runs/é",
    "runs/.tmp-123",
    "x" * 256,
    LONGEST_KEY + "e",
]


class RecordingStream(io.BytesIO):
    """A file object that remembers the size of every read asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_sizes: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.read_sizes.append(size)
        return super().read(size)


class FailingStream(io.RawIOBase):
    """Yields one chunk of data, then fails like a dropped upload."""

    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise ValueError("source went away")
        return b"partial" * 1000


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    if request.param == "s3":
        # A fresh bucket on moto's S3 server, reached over HTTP like any endpoint.
        return S3Store(request.getfixturevalue("s3_bucket"))
    return MemoryStore()


@pytest.fixture
def payload() -> bytes:
    return random.Random(0).randbytes(20 * 2**20)


class TestStoreContract:
    def test_roundtrip(self, store: Store) -> None:
        store.put(COMMIT, b'{"step": 100}')
        assert store.get(COMMIT) == b'{"step": 100}'
        assert store.exists(COMMIT)
        assert store.size(COMMIT) == 13
        with store.open_read(COMMIT) as stream:
            assert stream.read() == b'{"step": 100}'

    def test_empty_value_is_a_value(self, store: Store) -> None:
        store.put("runs/r1/empty", b"")
        assert store.exists("runs/r1/empty")
        assert store.get("runs/r1/empty") == b""
        assert store.size("runs/r1/empty") == 0

    def test_longest_valid_key_roundtrips(self, store: Store) -> None:
        assert len(LONGEST_KEY) == 1024
        store.put(LONGEST_KEY, b"x")
        assert store.list() == [LONGEST_KEY]

    def test_put_overwrites(self, store: Store) -> None:
        store.put("runs/r1/run.json", b"first version, longer")
        store.put("runs/r1/run.json", b"second")
        assert store.get("runs/r1/run.json") == b"second"
        assert store.size("runs/r1/run.json") == 6
        assert store.list() == ["runs/r1/run.json"]

    def test_put_if_absent_writes_once(self, store: Store) -> None:
        assert store.put_if_absent(COMMIT, b"winner") is True
        assert store.put_if_absent(COMMIT, b"loser") is False
        assert store.get(COMMIT) == b"winner"

    @pytest.mark.parametrize("step", range(5))
    def test_racing_put_if_absent_has_exactly_one_winner(self, store: Store, step: int) -> None:
        key = f"runs/race/commits/{step:012d}.json"
        barrier = threading.Barrier(8, timeout=60)

        def attempt(writer: int) -> bool:
            barrier.wait()
            return store.put_if_absent(key, f"writer {writer}".encode())

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(attempt, range(8)))
        assert results.count(True) == 1
        assert store.get(key) == f"writer {results.index(True)}".encode()
        assert store.list() == [key]

    def test_list_is_sorted_as_strings_and_filtered_by_prefix(self, store: Store) -> None:
        keys = ["runs/b/x", "runs/a/y", "runs/a/x", "runs/ab", "runs/a-z", "other"]
        for key in keys:
            store.put(key, key.encode())
        # '-' sorts before '/', so a per-directory walk order would be wrong here.
        assert store.list() == ["other", "runs/a-z", "runs/a/x", "runs/a/y", "runs/ab", "runs/b/x"]
        assert store.list("runs/a") == ["runs/a-z", "runs/a/x", "runs/a/y", "runs/ab"]
        assert store.list("runs/a/") == ["runs/a/x", "runs/a/y"]
        assert store.list("runs/a/x") == ["runs/a/x"]
        assert store.list("nothing") == []
        assert store.list("runs/zz/") == []

    @pytest.mark.parametrize("prefix", ["/runs", "runs//", "../", "runs/a b", "runs/../x"])
    def test_list_rejects_a_prefix_no_key_can_have(self, store: Store, prefix: str) -> None:
        with pytest.raises(InvalidInput, match="prefix"):
            store.list(prefix)

    def test_delete_is_idempotent(self, store: Store) -> None:
        store.put("runs/r1/a", b"1")
        store.put("runs/r1/b", b"2")
        store.delete("runs/r1/a")
        store.delete("runs/r1/a")
        store.delete("never/written")
        assert not store.exists("runs/r1/a")
        assert store.list() == ["runs/r1/b"]
        with pytest.raises(NotFound):
            store.get("runs/r1/a")

    @pytest.mark.parametrize("operation", ["get", "open_read", "size"])
    def test_missing_key_raises_not_found(self, store: Store, operation: str) -> None:
        with pytest.raises(NotFound) as caught:
            getattr(store, operation)(COMMIT)
        assert COMMIT in caught.value.message
        assert "excp ls" in caught.value.message
        assert not store.exists(COMMIT)

    def test_a_prefix_is_not_a_key(self, store: Store) -> None:
        store.put("runs/r1/run.json", b"{}")
        assert not store.exists("runs/r1")
        for operation in (store.get, store.open_read, store.size):
            with pytest.raises(NotFound):
                operation("runs/r1")
        store.delete("runs/r1")
        assert store.list() == ["runs/r1/run.json"]

    def test_a_key_and_a_key_beneath_it_conflict(self, store: Store) -> None:
        store.put("runs/a", b"file")
        store.put("runs/b/c", b"nested")
        with pytest.raises(Conflict):
            store.put("runs/a/x", b"under a file")
        with pytest.raises(Conflict):
            store.put_if_absent("runs/a/x", b"under a file")
        with pytest.raises(Conflict):
            store.put("runs/b", b"over a directory")
        with pytest.raises(Conflict):
            store.put_if_absent("runs/b", b"over a directory")
        assert store.list() == ["runs/a", "runs/b/c"]
        with pytest.raises(NotFound):
            store.get("runs/a/x")

    def test_deleting_the_last_key_beneath_frees_the_name(self, store: Store) -> None:
        store.put("runs/a/x", b"1")
        store.delete("runs/a/x")
        store.put("runs/a", b"2")
        assert store.get("runs/a") == b"2"

    def test_streaming_put_of_a_large_file(self, store: Store, tmp_path: Path, payload: bytes):
        source = tmp_path / "checkpoint.bin"
        source.write_bytes(payload)
        with source.open("rb") as stream:
            store.put("runs/r1/archives/big.excp", stream)
        assert store.size("runs/r1/archives/big.excp") == len(payload)
        assert store.get("runs/r1/archives/big.excp") == payload
        with store.open_read("runs/r1/archives/big.excp") as stream:
            assert stream.seekable()
            stream.seek(len(payload) - 100)
            assert stream.read() == payload[-100:]
            stream.seek(5)
            assert stream.read(7) == payload[5:12]

    def test_streaming_put_reads_in_bounded_chunks(self, store: Store, payload: bytes) -> None:
        stream = RecordingStream(payload)
        store.put("runs/r1/archives/big.excp", stream)
        assert store.get("runs/r1/archives/big.excp") == payload
        assert all(size is not None and 0 < size < len(payload) for size in stream.read_sizes)

    def test_streaming_put_starts_at_the_current_position(self, store: Store) -> None:
        stream = io.BytesIO(b"headerBODY")
        stream.seek(6)
        store.put("runs/r1/body", stream)
        assert store.get("runs/r1/body") == b"BODY"

    def test_failed_put_keeps_the_old_value(self, store: Store) -> None:
        store.put("runs/r1/archives/a.excp", b"old")
        with pytest.raises(ValueError, match="source went away"):
            store.put("runs/r1/archives/a.excp", FailingStream())
        with pytest.raises(ValueError, match="source went away"):
            store.put("runs/r1/archives/b.excp", FailingStream())
        assert store.get("runs/r1/archives/a.excp") == b"old"
        assert store.list() == ["runs/r1/archives/a.excp"]

    def test_open_stream_keeps_reading_the_value_it_opened(self, store: Store) -> None:
        store.put("runs/r1/run.json", b"old value")
        with store.open_read("runs/r1/run.json") as stream:
            store.put("runs/r1/run.json", b"new value, other length")
            assert stream.read() == b"old value"
        with store.open_read("runs/r1/run.json") as stream:
            store.delete("runs/r1/run.json")
            assert stream.read() == b"new value, other length"

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=ascii)
    @pytest.mark.parametrize(
        "operation",
        [
            lambda s, k: s.get(k),
            lambda s, k: s.open_read(k),
            lambda s, k: s.put(k, b"x"),
            lambda s, k: s.put(k, io.BytesIO(b"x")),
            lambda s, k: s.put_if_absent(k, b"x"),
            lambda s, k: s.exists(k),
            lambda s, k: s.size(k),
            lambda s, k: s.delete(k),
        ],
        ids=["get", "open_read", "put", "put_stream", "put_if_absent", "exists", "size", "delete"],
    )
    def test_invalid_keys_are_rejected_before_storage(self, store: Store, key: str, operation):
        with pytest.raises(InvalidInput) as caught:
            operation(store, key)
        assert repr(key) in caught.value.message
        assert "\n" not in caught.value.message
        assert store.list() == []


def test_validate_key_returns_valid_keys_unchanged() -> None:
    for key in [COMMIT, "runs/r=1/x-y_z.excp", "a", "..a", "a..", LONGEST_KEY]:
        assert validate_key(key) == key
    for key in INVALID_KEYS:
        with pytest.raises(InvalidInput):
            validate_key(key)


class TestLocalStore:
    def test_no_temp_files_remain_after_writes(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path)
        store.put("runs/r1/run.json", b"{}")
        store.put("runs/r1/archives/a.excp", io.BytesIO(b"archive"))
        assert store.put_if_absent(COMMIT, b"commit")
        assert not store.put_if_absent(COMMIT, b"again")
        store.put("runs/r1/gone", b"x")
        store.delete("runs/r1/gone")
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in files)
        assert on_disk == ["runs/r1/archives/a.excp", COMMIT, "runs/r1/run.json"]
        assert store.list() == on_disk

    def test_leftover_temp_file_is_not_listed(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path)
        store.put("runs/r1/archives/a.excp", b"archive")
        (tmp_path / "runs/r1/archives/.tmp-0123abcd").write_bytes(b"half an archive")
        (tmp_path / ".tmp-top").write_bytes(b"half a record")
        assert store.list() == ["runs/r1/archives/a.excp"]
        assert store.list("runs/r1/archives/") == ["runs/r1/archives/a.excp"]
        assert store.list(".tmp-") == []

    def test_keys_are_files_under_the_root(self, tmp_path: Path) -> None:
        LocalStore(tmp_path / "store").put(COMMIT, b"commit")
        assert (tmp_path / "store" / COMMIT).read_bytes() == b"commit"

    def test_delete_removes_emptied_directories_but_not_the_root(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path / "store")
        store.put("runs/r1/archives/a.excp", b"a")
        store.put("runs/r2/run.json", b"{}")
        store.delete("runs/r1/archives/a.excp")
        assert not (tmp_path / "store/runs/r1").exists()
        assert (tmp_path / "store/runs/r2").is_dir()
        store.delete("runs/r2/run.json")
        assert list((tmp_path / "store").iterdir()) == []

    def test_reading_a_store_that_was_never_written_creates_nothing(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path / "store")
        assert store.list() == []
        assert not store.exists(COMMIT)
        store.delete(COMMIT)
        assert not (tmp_path / "store").exists()

    def test_an_unusable_root_raises_store_unavailable(self, tmp_path: Path) -> None:
        (tmp_path / "a-file").write_bytes(b"not a directory")
        store = LocalStore(tmp_path / "a-file" / "store")
        with pytest.raises(StoreUnavailable) as caught:
            store.put(COMMIT, b"commit")
        assert str(tmp_path / "a-file") in caught.value.message
        with pytest.raises(NotFound):
            store.get(COMMIT)

    def test_a_root_that_is_a_file_is_refused_at_once(self, tmp_path: Path) -> None:
        """Reading through a file would find nothing: no runs, every run missing."""
        (tmp_path / "a-file").write_bytes(b"not a directory")
        for url in (str(tmp_path / "a-file"), (tmp_path / "a-file").as_uri()):
            with pytest.raises(InvalidInput, match="a-file is a file, not a store directory: pass the "
                                                   "directory that holds runs/"):
                open_store(url)
        assert (tmp_path / "a-file").read_bytes() == b"not a directory"

    def test_url_reopens_the_same_directory(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path / "with space")
        store.put("k", b"v")
        assert store.url.startswith("file:///")
        reopened = open_store(store.url)
        assert isinstance(reopened, LocalStore)
        assert reopened.get("k") == b"v"


class TestOpenStore:
    def test_plain_path_is_a_local_store(self, tmp_path: Path) -> None:
        store = open_store(str(tmp_path / "s"))
        assert isinstance(store, LocalStore)
        assert store.root == tmp_path / "s"

    def test_file_url_is_a_local_store(self, tmp_path: Path) -> None:
        store = open_store(f"file://{tmp_path}/s")
        assert isinstance(store, LocalStore)
        assert store.root == tmp_path / "s"

    def test_named_memory_store_is_shared(self) -> None:
        name = f"test-{uuid.uuid4().hex}"
        first = open_store(f"memory://{name}")
        first.put("k", b"v")
        second = open_store(f"memory://{name}")
        assert second is first
        assert second.get("k") == b"v"
        assert second.url == f"memory://{name}"
        assert open_store(f"memory://{name}-other") is not first

    def test_anonymous_memory_store_is_fresh_each_time(self) -> None:
        first = open_store("memory://")
        first.put("k", b"v")
        second = open_store("memory://")
        assert isinstance(second, MemoryStore)
        assert second is not first
        assert not second.exists("k")

    @pytest.mark.usefixtures("s3_env")
    def test_s3_url_is_an_s3_store(self) -> None:
        store = open_store("s3://bucket/prefix")
        assert isinstance(store, S3Store)
        assert store.url == "s3://bucket/prefix"

    @pytest.mark.parametrize("url", ["ftp://host/dir", "http://host/store", "file://", ""])
    def test_other_forms_are_refused_with_the_accepted_ones(self, url: str) -> None:
        with pytest.raises(InvalidInput) as caught:
            open_store(url)
        assert "file://" in caught.value.message

    @pytest.mark.parametrize("url", ["ftp://host/dir", "gs://bucket/prefix", ""])
    def test_refusals_list_every_accepted_form(self, url: str) -> None:
        with pytest.raises(InvalidInput) as caught:
            open_store(url)
        for form in ("directory", "file://DIR", "memory://", "s3://BUCKET", "s3://BUCKET/PREFIX"):
            assert form in caught.value.message

    def test_env_variable_is_the_default(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setenv("EXCP_STORE", str(tmp_path / "from-env"))
        store = open_store()
        assert isinstance(store, LocalStore)
        assert store.root == tmp_path / "from-env"

    def test_without_env_the_default_is_excp_store_here(self, tmp_path: Path, monkeypatch):
        monkeypatch.delenv("EXCP_STORE", raising=False)
        monkeypatch.chdir(tmp_path)
        store = open_store()
        assert isinstance(store, LocalStore)
        assert store.root == Path(os.getcwd()) / "excp-store"
