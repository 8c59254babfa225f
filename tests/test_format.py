"""Container v1 (docs/format.md): exact layout, roundtrips, determinism, and a suspicious reader.

Whatever bytes the reader is given, every failure must be ``CorruptData`` (or its
subclass ``UnsupportedVersion``), raised before anything is allocated from a size the
file declares. ``_with_index`` rewrites an archive's index with valid checksums, so
the tests reach the checks behind them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard

from excp import api
from excp.errors import CorruptData, UnsupportedVersion
from excp.format import container
from excp.format.container import CHUNK_SIZE, END_MAGIC, MAGIC, ArchiveReader, ArchiveWriter
from excp.store import MemoryStore

PRELUDE, TRAILER = 16, 48
SMALL_CHUNK = 64


def _archive(chunk_size: int = SMALL_CHUNK) -> bytes:
    """Two units (several chunks each, one empty stream) and two extras."""
    buf = io.BytesIO()
    writer = ArchiveWriter(buf, chunk_size=chunk_size)
    ramp = torch.arange(100, dtype=torch.float32)
    noise = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)
    writer.add_unit("a", "planes", [{"name": "a", "role": "other", "param": None,
                                     "dtype": "float32", "shape": [100]}],
                    {"xor": False}, {"planes": ramp})
    writer.add_unit("b", "test", [], {"k": 1}, {"noise": noise, "zeros": bytes(200), "empty": b""})
    writer.add_extra("cfg", b'{"lr": 0.001}')
    writer.add_extra("blob", bytes(range(256)) * 2)
    writer.finish({"layout": "test", "run": "r", "step": 3, "parent": None, "keyframe": True,
                   "params": {"mode": "excp"}})
    return buf.getvalue()


def _open(data: bytes, size: int | None = None) -> ArchiveReader:
    return ArchiveReader(io.BytesIO(data), len(data) if size is None else size, "test archive")


def _read_everything(reader: ArchiveReader) -> None:
    for unit in reader.units:
        for name in unit.streams:
            reader.read_stream(unit, name)
    for name in reader.extras:
        reader.read_extra(name)
    reader.verify()


def _fails_cleanly(data: bytes, size: int | None = None) -> str:
    """Where a bad archive is caught ('open' or 'read'); fails the test if it is not
    caught, or caught as anything but CorruptData."""
    try:
        reader = _open(data, size)
    except CorruptData:
        return "open"
    with pytest.raises(CorruptData):
        _read_everything(reader)
    return "read"


def _trailer(data: bytes) -> tuple[int, int, int, int, int, bytes]:
    return struct.unpack("<QQQQQ8s", data[-TRAILER:])


def _index(data: bytes) -> dict[str, Any]:
    offset, length, *_ = _trailer(data)
    return json.loads(zstandard.ZstdDecompressor().decompress(data[offset:offset + length]))


def _with_raw_index(data: bytes, raw: bytes, raw_length: int | None = None) -> bytes:
    """``data`` with its index replaced by the zstd frame of ``raw`` and a consistent
    trailer: every checksum is right, only the content is wrong."""
    offset = _trailer(data)[0]
    frame = zstandard.ZstdCompressor().compress(raw)
    head = data[:offset] + frame + struct.pack(
        "<QQQQ", offset, len(frame), len(raw) if raw_length is None else raw_length,
        xxhash.xxh64_intdigest(frame))
    return head + struct.pack("<Q8s", xxhash.xxh64_intdigest(head), END_MAGIC)


def _with_index(data: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    index = _index(data)
    change(index)
    return _with_raw_index(data, json.dumps(index).encode())


def _chunks(index: dict[str, Any], unit: int = 0, stream: str = "planes") -> list[list[Any]]:
    return index["units"][unit]["streams"][stream]["chunks"]


# --- layout, roundtrip, determinism ------------------------------------------------


def test_layout_is_what_format_md_says() -> None:
    data = _archive()
    assert data[:8] == MAGIC == b"\x89EXCP\r\n\x1a"
    assert struct.unpack("<II", data[8:16]) == (1, 0)
    offset, length, raw_length, index_xxh, file_xxh, end = _trailer(data)
    assert end == END_MAGIC == b"EXCPEND\x00"
    assert offset + length == len(data) - TRAILER
    assert index_xxh == xxhash.xxh64_intdigest(data[offset:offset + length])
    assert file_xxh == xxhash.xxh64_intdigest(data[:-16])
    raw = zstandard.ZstdDecompressor().decompress(data[offset:offset + length])
    assert len(raw) == raw_length
    index = json.loads(raw)
    assert raw == json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
    assert sorted(index) == ["chunk_size", "extras", "format", "header", "units", "version"]
    assert (index["format"], index["version"], index["chunk_size"]) == ("excp", 1, SMALL_CHUNK)
    assert sorted(index["units"][0]) == ["codec", "meta", "name", "streams", "tensors"]
    assert sorted(index["extras"][0]) == ["chunks", "name", "size"]
    # the data section is exactly the chunks, back to back, from byte 16 to the index
    streams = [s for u in index["units"] for s in u["streams"].values()] + index["extras"]
    spans = sorted((c[0], c[0] + c[1]) for s in streams for c in s["chunks"])
    assert spans[0][0] == PRELUDE and spans[-1][1] == offset
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    for unit in index["units"]:
        for stream in unit["streams"].values():
            for chunk_offset, chunk_length, chunk_raw, digest in stream["chunks"]:
                frame = data[chunk_offset:chunk_offset + chunk_length]
                assert xxhash.xxh64_hexdigest(frame) == digest
                assert len(zstandard.ZstdDecompressor().decompress(frame)) == chunk_raw


@pytest.mark.parametrize("chunk_size", [SMALL_CHUNK, CHUNK_SIZE])
def test_streams_of_odd_sizes_roundtrip(chunk_size: int) -> None:
    sizes = [0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 3 * chunk_size + 7]
    rng = np.random.default_rng(1)
    payloads = {f"s{n}": rng.integers(0, 8, n, dtype=np.uint8).tobytes() for n in sizes}
    tensor = torch.randn(chunk_size // 4 + 3, dtype=torch.float32)  # not a multiple of a chunk
    buf = io.BytesIO()
    writer = ArchiveWriter(buf, chunk_size=chunk_size)
    writer.add_unit("u", "test", [], {}, dict(payloads))
    writer.add_unit("t", "test", [], {}, {"tensor": tensor, "numpy": tensor.numpy()})
    for name, payload in payloads.items():
        writer.add_extra(name, payload)
    summary = writer.finish({"layout": "test"})
    data = buf.getvalue()
    assert summary.size == len(data)

    reader = _open(data)
    reader.verify()
    assert reader.chunk_size == chunk_size and reader.header == {"layout": "test"}
    unit, tensors = reader.units
    for name, payload in payloads.items():
        assert bytes(reader.read_stream(unit, name)) == payload
        assert reader.read_extra(name) == payload
        chunks = unit.streams[name]["chunks"]
        assert len(chunks) == -(-len(payload) // chunk_size)
        assert [c[2] for c in chunks] == [min(chunk_size, len(payload) - i * chunk_size)
                                           for i in range(len(chunks))]
    expected = tensor.view(torch.uint8).numpy().tobytes()
    assert bytes(reader.read_stream(tensors, "tensor")) == expected
    assert bytes(reader.read_stream(tensors, "numpy")) == expected


def test_same_input_gives_same_bytes() -> None:
    first, second = _archive(), _archive()
    assert first == second
    buf = io.BytesIO()
    writer = ArchiveWriter(buf, chunk_size=SMALL_CHUNK)
    writer.add_extra("x", b"1")
    summary = writer.finish({})
    assert summary.digest == hashlib.blake2b(buf.getvalue(), digest_size=16).hexdigest()


def test_same_checkpoint_gives_same_archive_through_the_codec() -> None:
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Linear(24, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 24, generator=gen)).square().mean().backward()
    opt.step()
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    archives = []
    for _ in range(2):
        store = MemoryStore()
        result, _ = api.push(checkpoint, "det", store=store)
        archives.append(store.get(result.commit.archive))
    assert archives[0] == archives[1]


# --- truncation and bit flips -------------------------------------------------------


def test_truncation_anywhere_is_corrupt_data() -> None:
    data = _archive()
    n = len(data)
    cuts = {0, 1, 8, 15, 16, 17, 63, 64, n - TRAILER - 1, n - TRAILER, n - TRAILER + 1,
            n - 17, n - 16, n - 8, n - 1}
    cuts |= {round(i * n / 30) for i in range(30)}
    assert len(cuts) >= 40
    for cut in sorted(cuts):
        with pytest.raises(CorruptData):
            _open(data[:cut])  # a file that is simply shorter
        # a file shorter than the size its store claims: short reads, never garbage
        _fails_cleanly(data[:cut], size=n)


def _flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_byte_flip_in_prelude_and_trailer_is_detected(mask: int) -> None:
    data = _archive()
    n = len(data)
    where = {}
    for position in [*range(PRELUDE), *range(n - TRAILER, n)]:
        where[position] = _fails_cleanly(_flip(data, position, mask))
    # magic, version, index location/length/checksum and end marker: refused on open
    for position in [*range(12), *range(n - TRAILER, n - TRAILER + 16),
                     *range(n - 24, n - 16), *range(n - 8, n)]:
        assert where[position] == "open", position


@pytest.mark.parametrize("position", range(8, 12))
def test_version_byte_flip_is_unsupported_version(position: int) -> None:
    with pytest.raises(UnsupportedVersion):
        _open(_flip(_archive(), position, 0x02))


def test_sampled_flips_in_data_and_index_are_detected() -> None:
    data = _archive()
    index_offset = _trailer(data)[0]
    index = _index(data)
    owners = [(c[0], c[0] + c[1], u["name"], name) for u in index["units"]
              for name, s in u["streams"].items() for c in s["chunks"]]
    owners += [(c[0], c[0] + c[1], None, e["name"]) for e in index["extras"] for c in e["chunks"]]
    rng = random.Random(7)
    for position in rng.sample(range(PRELUDE, index_offset), 40):
        reader = _open(_flip(data, position, 1 << rng.randrange(8)))  # index intact: opens
        unit, name = next((u, n) for start, end, u, n in owners if start <= position < end)
        with pytest.raises(CorruptData, match="checksum mismatch"):  # the touched chunk fails
            if unit is None:
                reader.read_extra(name)
            else:
                reader.read_stream(next(x for x in reader.units if x.name == unit), name)
        with pytest.raises(CorruptData):
            reader.verify()
    for position in rng.sample(range(index_offset, len(data) - TRAILER), 20):
        with pytest.raises(CorruptData, match="index checksum"):
            _open(_flip(data, position, 1 << rng.randrange(8)))


# --- versions and tampered indexes --------------------------------------------------


def test_newer_version_is_unsupported_version() -> None:
    data = bytearray(_archive())
    data[8:12] = struct.pack("<I", 2)
    with pytest.raises(UnsupportedVersion, match="version 2"):
        _open(bytes(data))
    with pytest.raises(UnsupportedVersion):
        _open(_with_index(_archive(), lambda ix: ix.update(version=2)))


def _set_chunk(i: int, j: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(index: dict[str, Any]) -> None:
        _chunks(index)[i][j] = value
    return change


def _overlap(index: dict[str, Any]) -> None:
    first, second = _chunks(index)[:2]
    second[0] = first[0] + 1


def _same_chunk_twice(index: dict[str, Any]) -> None:
    index["units"][1]["streams"]["zeros"]["chunks"][0] = list(_chunks(index)[0][:2]) + [
        SMALL_CHUNK, _chunks(index)[0][3]]


def _into_index(index: dict[str, Any]) -> None:
    chunk = index["extras"][-1]["chunks"][-1]
    chunk[1] += 5  # runs into the index frame


def _size_mismatch(index: dict[str, Any]) -> None:
    index["units"][0]["streams"]["planes"]["size"] += 1


def _one_tb(index: dict[str, Any]) -> None:
    stream = index["units"][0]["streams"]["planes"]
    stream["size"] = 1 << 40
    stream["chunks"] = [[*stream["chunks"][0][:2], 1 << 40, stream["chunks"][0][3]]]


def _one_tb_repeated(index: dict[str, Any]) -> None:
    stream = index["units"][0]["streams"]["planes"]
    stream["size"] = 1 << 40
    stream["chunks"] = [list(stream["chunks"][0])] * 16384


OUTSIDE = "overlap or fall outside"
TAMPERED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # name: (change to the index, what the reader must say)
    "chunk before the data section": (_set_chunk(0, 0, 0), OUTSIDE),
    "chunk at a negative offset": (_set_chunk(0, 0, -5), "non-negative integer"),
    "chunk past the end of the file": (_set_chunk(0, 0, 10**9), OUTSIDE),
    "chunk running into the index": (_into_index, OUTSIDE),
    "chunks overlapping": (_overlap, OUTSIDE),
    "one chunk used by two streams": (_same_chunk_twice, OUTSIDE),
    "zero-length chunk": (_set_chunk(0, 1, 0), "bad chunk size"),
    "zero raw length": (_set_chunk(0, 2, 0), "bad chunk size"),
    "raw length above chunk_size": (_set_chunk(0, 2, SMALL_CHUNK + 1), "bad chunk size"),
    "stream size disagreeing with its chunks": (_size_mismatch, "declares 401 bytes"),
    "stream of 1 TB in one chunk": (_one_tb, "bad chunk size"),
    "stream of 1 TB, one chunk repeated": (_one_tb_repeated, "declares 1099511627776 bytes"),
    "chunk entry of three fields": (lambda ix: _chunks(ix)[0].pop(), "malformed index"),
    "chunk entry of five fields": (lambda ix: _chunks(ix)[0].append(0), "malformed index"),
    "chunks not a list": (lambda ix: ix["units"][0]["streams"]["planes"].update(chunks=7),
                          "malformed index"),
    "stream without size": (lambda ix: ix["units"][0]["streams"]["planes"].pop("size"),
                            "malformed index"),
    "string offset": (_set_chunk(0, 0, "16"), "malformed index"),
    "not an excp index": (lambda ix: ix.update(format="zip"), "not an excp index"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_tampered_index_is_refused_on_open_without_allocating(name: str) -> None:
    change, reason = TAMPERED[name]
    bad = _with_index(_archive(), change)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptData, match=reason):
            _open(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{name}: {peak} bytes allocated before refusing"


@pytest.mark.parametrize("raw_length", [None, container.MAX_INDEX_BYTES + 1, 1 << 62])
def test_index_that_is_not_json_or_not_zstd_or_too_big(raw_length: int | None) -> None:
    data = _archive()
    with pytest.raises(CorruptData):
        _open(_with_raw_index(data, b"\xff not json", raw_length))
    with pytest.raises(CorruptData):
        _open(_with_raw_index(data, b"[1, 2, 3]", raw_length))
    # a frame that is not zstd at all, with a correct checksum
    offset = _trailer(data)[0]
    garbage = os.urandom(40)
    head = data[:offset] + garbage + struct.pack("<QQQQ", offset, len(garbage), raw_length or 100,
                                                 xxhash.xxh64_intdigest(garbage))
    with pytest.raises(CorruptData):
        _open(head + struct.pack("<Q8s", xxhash.xxh64_intdigest(head), END_MAGIC))


def test_chunk_lies_are_caught_when_read() -> None:
    """Checks that need the chunk itself: a wrong raw length or a swapped checksum."""
    for delta in (-1, -SMALL_CHUNK // 2):  # chunk 1 holds SMALL_CHUNK bytes, says fewer
        def change(index: dict[str, Any], delta: int = delta) -> None:
            _chunks(index)[1][2] += delta
            index["units"][0]["streams"]["planes"]["size"] += delta
        smaller = _open(_with_index(_archive(), change))
        with pytest.raises(CorruptData):
            smaller.read_stream(smaller.units[0], "planes")

    def claim_full_last_chunk(index: dict[str, Any]) -> None:  # the last chunk holds 16 bytes
        last = _chunks(index)[-1]
        index["units"][0]["streams"]["planes"]["size"] += SMALL_CHUNK - last[2]
        last[2] = SMALL_CHUNK

    bigger = _open(_with_index(_archive(), claim_full_last_chunk))
    with pytest.raises(CorruptData, match="decodes to"):
        bigger.read_stream(bigger.units[0], "planes")
    for lie in (_set_chunk(0, 3, "0" * 16), _set_chunk(0, 3, _chunks(_index(_archive()), 0)[1][3])):
        reader = _open(_with_index(_archive(), lie))
        with pytest.raises(CorruptData, match="checksum"):
            reader.read_stream(reader.units[0], "planes")
    missing = _open(_archive())
    with pytest.raises(CorruptData):
        missing.read_stream(missing.units[0], "nope")
    with pytest.raises(CorruptData):
        missing.read_extra("nope")


class _Refused(Exception):
    pass


def _guarded_bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int) and args[0] > 1 << 30:
        raise _Refused(f"the reader tried to allocate {args[0]} bytes")
    return bytearray(*args)


def test_huge_chunk_size_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    def change(index: dict[str, Any]) -> None:
        index["chunk_size"] = 1 << 40
        _one_tb(index)
    monkeypatch.setattr(container, "bytearray", _guarded_bytearray, raising=False)
    bad = _with_index(_archive(), change)
    with pytest.raises(CorruptData):
        reader = _open(bad)
        reader.read_stream(reader.units[0], "planes")


MALFORMED = {
    "index without header": lambda ix: ix.pop("header"),
    "index without chunk_size": lambda ix: ix.pop("chunk_size"),
    "index without units": lambda ix: ix.pop("units"),
    "unit that is not an object": lambda ix: ix.update(units=[5]),
    "extra that is not an object": lambda ix: ix.update(extras=[5]),
    "unit without meta": lambda ix: ix["units"][0].pop("meta"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_index_missing_keys_is_corrupt_data(name: str) -> None:
    with pytest.raises(CorruptData):
        _open(_with_index(_archive(), MALFORMED[name]))


@pytest.mark.parametrize("field", [0, 1, 2])
def test_float_in_chunk_table_is_corrupt_data(field: int) -> None:
    def change(index: dict[str, Any]) -> None:
        chunk = _chunks(index)[0]
        chunk[field] = float(chunk[field])
        if field == 2:
            index["units"][0]["streams"]["planes"]["size"] = float(
                index["units"][0]["streams"]["planes"]["size"])
    with pytest.raises(CorruptData):
        reader = _open(_with_index(_archive(), change))
        reader.read_stream(reader.units[0], "planes")


def test_deeply_nested_index_is_corrupt_data() -> None:
    with pytest.raises(CorruptData):
        _open(_with_raw_index(_archive(), b'{"a":' + b"[" * 200_000))


# --- not an archive at all ------------------------------------------------------------


def test_files_that_are_not_archives(tmp_path) -> None:
    rng = np.random.default_rng(5)
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "ckpt.pt")
    candidates = {
        "empty": b"",
        "short": b"\x89EXCP",
        "torch.save": (tmp_path / "ckpt.pt").read_bytes(),
        "text": b"hello world\n" * 20,
        "zeros": bytes(4096),
        "magic then zeros": MAGIC + struct.pack("<II", 1, 0) + bytes(200),
        "magic, version, end marker only": MAGIC + struct.pack("<II", 1, 0) + bytes(40) + END_MAGIC,
        **{f"random {n}": rng.integers(0, 256, n, dtype=np.uint8).tobytes()
           for n in (10, 63, 64, 65, 1000, 100_000)},
    }
    for name, data in candidates.items():
        with pytest.raises(CorruptData) as info:
            _open(data)
        assert "test archive" in str(info.value), name
