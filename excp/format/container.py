"""Container format v1: one archive file, written front to back, read suspiciously.

Layout (all integers little-endian; docs/format.md has the byte-by-byte spec)::

    prelude   16 B   magic b"\\x89EXCP\\r\\n\\x1a", u32 version, u32 flags (0)
    data      ...    zstd frames, one per chunk of every stream, back to back
    index     ...    one zstd frame holding the JSON index
    trailer   48 B   u64 index offset, u64 index length, u64 index raw length,
                     u64 xxh64(index frame), u64 xxh64(bytes 0 .. here), magic b"EXCPEND\\0"

The index is at the end so the writer streams: it never holds more than one chunk
of compressed output, and never a whole checkpoint's bytes twice. Each chunk is an
independent standard zstd frame with its own xxh64, so a reader can decode streams
in parallel (or on a GPU) and verify exactly what it touches. The reader checks
every offset and length in the index against the file before it allocates or
decompresses anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
import xxhash
import zstandard

from excp.errors import CorruptData, UnsupportedVersion

MAGIC = b"\x89EXCP\r\n\x1a"
END_MAGIC = b"EXCPEND\x00"
VERSION = 1
PRELUDE = struct.Struct("<8sII")
TRAILER = struct.Struct("<QQQQQ8s")
CHUNK_SIZE = 1 << 18
MAX_INDEX_BYTES = 1 << 28
MAX_CHUNK_SIZE = 1 << 26
THREADS = max(2, min(8, os.cpu_count() or 2))
"""zstd threads per archive writer: a GPU node codes tensors faster than two cores
entropy-code their streams; more than eight buys little for chunks of 256 KiB."""
# Lossy streams are near-i.i.d. symbols (codes, masks): short LZ matches only cost bits
# there (level 3 codes a 15-symbol stream at ~3.9 bits/symbol with its default min
# match, at ~3.4 = its entropy with 7). Byte planes of lossless mode keep zstd's default.
SYMBOL_MIN_MATCH = 7

StreamData = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def _as_bytes(data: StreamData) -> memoryview:
    if isinstance(data, torch.Tensor):
        data = data.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return memoryview(data).cast("B")


@dataclass
class ArchiveSummary:
    """What a finished archive is: size, content digest (blake2b-128 hex), the
    compressed bytes per stream name (for ``inspect`` and the benchmark) and its header."""

    size: int
    digest: str
    stream_bytes: dict[str, int]
    header: dict[str, Any]


class ArchiveWriter:
    """Writes one archive to a binary file object opened for writing.

    Call :meth:`add_unit` / :meth:`add_extra` in any order, then :meth:`finish` once.
    ``symbols`` tunes zstd for streams of codes and masks (lossy mode).
    """

    def __init__(self, fileobj: BinaryIO, *, level: int = 3, chunk_size: int = CHUNK_SIZE,
                 symbols: bool = True) -> None:
        self._file = fileobj
        self._params = zstandard.ZstdCompressionParameters.from_level(
            level, **({"min_match": SYMBOL_MIN_MATCH} if symbols else {}))
        self._local = threading.local()
        self._chunk_size = chunk_size
        self._offset = 0
        self._xxh = xxhash.xxh64()
        self._blake = hashlib.blake2b(digest_size=16)
        self._units: list[dict[str, Any]] = []
        self._extras: list[dict[str, Any]] = []
        self._stream_bytes: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(THREADS)
        self._write(PRELUDE.pack(MAGIC, VERSION, 0))

    def _compress(self, data: memoryview) -> bytes:
        """zstd compressors are not thread-safe: one per worker thread."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(compression_params=self._params)
            self._local.compressor = compressor
        return compressor.compress(data)

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._xxh.update(data)
        self._blake.update(data)
        self._offset += len(data)

    def _write_stream(self, name: str, data: StreamData) -> dict[str, Any]:
        raw = _as_bytes(data)
        pieces = [raw[i:i + self._chunk_size] for i in range(0, len(raw), self._chunk_size)]
        frames: Iterable[bytes] = self._pool.map(self._compress, pieces) \
            if len(pieces) > 1 else [self._compress(p) for p in pieces]
        chunks = []
        for piece, frame in zip(pieces, frames, strict=True):
            chunks.append([self._offset, len(frame), len(piece), xxhash.xxh64_hexdigest(frame)])
            self._write(frame)
            self._stream_bytes[name] = self._stream_bytes.get(name, 0) + len(frame)
        return {"size": len(raw), "chunks": chunks}

    def add_unit(self, name: str, codec: str, tensors: list[dict[str, Any]],
                 meta: dict[str, Any], streams: dict[str, StreamData]) -> None:
        """One coded unit: ``tensors`` describes what it restores (name, role, dtype,
        shape), ``meta`` the codec's small parameters, ``streams`` its raw bytes."""
        entry = {"name": name, "codec": codec, "tensors": tensors, "meta": meta,
                 "streams": {s: self._write_stream(s, d) for s, d in streams.items()}}
        self._units.append(entry)

    def add_extra(self, name: str, data: bytes) -> None:
        """Opaque bytes restored bit-exact (configs, scheduler, RNG, layout skeleton)."""
        self._extras.append({"name": name, **self._write_stream("extras", data)})

    def finish(self, header: dict[str, Any]) -> ArchiveSummary:
        """Write the index and trailer. ``header`` describes the checkpoint."""
        self._pool.shutdown()
        index = {"format": "excp", "version": VERSION, "chunk_size": self._chunk_size,
                 "header": header, "units": self._units, "extras": self._extras}
        raw = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
        frame = self._compress(memoryview(raw))
        index_offset = self._offset
        self._write(frame)
        head = TRAILER.pack(index_offset, len(frame), len(raw), xxhash.xxh64_intdigest(frame),
                            0, END_MAGIC)[:32]
        self._write(head)
        tail = struct.pack("<Q8s", self._xxh.intdigest(), END_MAGIC)
        self._write(tail)
        return ArchiveSummary(self._offset, self._blake.hexdigest(), dict(self._stream_bytes), header)


def _count(value: Any) -> int:
    """A non-negative JSON integer (not a float, not a bool) from the index."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


@dataclass
class Unit:
    name: str
    codec: str
    tensors: list[dict[str, Any]]
    meta: dict[str, Any]
    streams: dict[str, dict[str, Any]]


class ArchiveReader:
    """Reads an archive from a seekable binary file object of known ``size``.

    The constructor reads and validates the prelude, trailer and index; stream data
    is read on demand. Every failure is :class:`CorruptData` (or
    :class:`UnsupportedVersion`) naming ``label`` (e.g. the run and step).
    """

    def __init__(self, fileobj: BinaryIO, size: int, label: str = "archive") -> None:
        self._file = fileobj
        self._size = size
        self.label = label
        self._decompressor = zstandard.ZstdDecompressor()
        index = self._read_index()
        try:
            self.header: dict[str, Any] = dict(index["header"])
            self.chunk_size: int = _count(index["chunk_size"])
            self.units = [Unit(str(u["name"]), str(u["codec"]), list(u["tensors"]), dict(u["meta"]),
                               dict(u["streams"])) for u in index["units"]]
            self.extras = {str(e["name"]): dict(e) for e in index["extras"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail(f"malformed index ({exc!r})") from None
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise self._fail(f"chunk size {self.chunk_size} out of range")
        self._check_chunks(index)

    def _fail(self, what: str) -> CorruptData:
        return CorruptData(f"{self.label} is corrupt: {what}; push it again or restore another step")

    def _read_at(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:
            raise self._fail(f"truncated at byte {offset + len(data)} of {self._size}")
        return data

    def _read_index(self) -> dict[str, Any]:
        if self._size < PRELUDE.size + TRAILER.size:
            raise self._fail(f"{self._size} bytes is too short for an excp archive")
        magic, version, _flags = PRELUDE.unpack(self._read_at(0, PRELUDE.size))
        if magic != MAGIC:
            raise self._fail("not an excp archive (bad magic)")
        if version != VERSION:
            raise UnsupportedVersion(
                f"{self.label} has format version {version}; this excp reads version {VERSION}: "
                "upgrade excp")
        trailer = self._read_at(self._size - TRAILER.size, TRAILER.size)
        offset, length, raw_length, index_xxh, _, end = TRAILER.unpack(trailer)
        if end != END_MAGIC:
            raise self._fail("missing end marker (truncated?)")
        if not (PRELUDE.size <= offset and offset + length == self._size - TRAILER.size
                and raw_length <= MAX_INDEX_BYTES):
            raise self._fail("index location out of range")
        frame = self._read_at(offset, length)
        if xxhash.xxh64_intdigest(frame) != index_xxh:
            raise self._fail("index checksum mismatch")
        try:
            raw = self._decompressor.decompress(frame, max_output_size=raw_length)
            index = json.loads(raw)
        except (zstandard.ZstdError, ValueError, RecursionError) as exc:
            raise self._fail(f"unreadable index ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != "excp":
            raise self._fail("index is not an excp index")
        if index.get("version") != VERSION:
            raise UnsupportedVersion(f"{self.label} index has version {index.get('version')}")
        self._data_end = offset
        return index

    def _streams(self, index: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
        for unit in index["units"]:
            for name, stream in unit["streams"].items():
                yield f"{unit['name']}/{name}", stream
        for extra in index["extras"]:
            yield f"extra {extra['name']}", extra

    def _check_chunks(self, index: dict[str, Any]) -> None:
        """Every chunk inside the data section, none overlapping, sizes consistent."""
        spans = []
        try:
            for label, stream in self._streams(index):
                total = 0
                for offset, length, raw, _digest in stream["chunks"]:
                    offset, length, raw = _count(offset), _count(length), _count(raw)
                    if not (0 < raw <= self.chunk_size and length > 0):
                        raise self._fail(f"bad chunk size in {label}")
                    spans.append((offset, offset + length))
                    total += raw
                if total != _count(stream["size"]):
                    raise self._fail(f"stream {label} declares {stream['size']} bytes, chunks hold {total}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail(f"malformed index ({exc!r})") from None
        spans.sort()
        cursor = PRELUDE.size
        for start, end in spans:
            if start < cursor or end > self._data_end:
                raise self._fail("chunk offsets overlap or fall outside the data section")
            cursor = end

    def _chunks(self, label: str, stream: dict[str, Any]) -> Iterator[bytes]:
        """A stream's chunks one at a time, each checked and decoded."""
        for offset, length, raw, digest in stream["chunks"]:
            frame = self._read_at(offset, length)
            if xxhash.xxh64_hexdigest(frame) != digest:
                raise self._fail(f"checksum mismatch in {label}")
            try:
                piece = self._decompressor.decompress(frame, max_output_size=raw)
            except zstandard.ZstdError as exc:
                raise self._fail(f"undecodable chunk in {label} ({exc})") from None
            if len(piece) != raw:
                raise self._fail(f"chunk of {label} decodes to {len(piece)} bytes, expected {raw}")
            yield piece

    def _read_chunks(self, label: str, stream: dict[str, Any]) -> bytearray:
        """Decode a stream chunk by chunk; memory grows only with data actually read."""
        out = bytearray()
        for piece in self._chunks(label, stream):
            out += piece
        return out

    def read_stream(self, unit: Unit, name: str) -> bytearray:
        if name not in unit.streams:
            raise self._fail(f"unit {unit.name!r} has no stream {name!r}")
        return self._read_chunks(f"{unit.name}/{name}", unit.streams[name])

    def read_extra(self, name: str) -> bytes:
        if name not in self.extras:
            raise self._fail(f"no extra named {name!r}")
        return bytes(self._read_chunks(f"extra {name}", self.extras[name]))

    def verify(self) -> None:
        """Whole-file checksum plus every chunk's checksum and decode, each decoded chunk
        dropped at once: checking an archive holds one chunk, never a whole stream (up to
        a tensor's worth of bytes), so the service, which checks every upload and several
        at a time, needs memory independent of the archives' size."""
        hasher = xxhash.xxh64()
        self._file.seek(0)
        remaining = self._size - 16
        while remaining > 0:
            block = self._file.read(min(remaining, 1 << 20))
            if not block:
                raise self._fail("truncated")
            hasher.update(block)
            remaining -= len(block)
        (file_xxh,) = struct.unpack("<Q", self._read_at(self._size - 16, 8))
        if hasher.intdigest() != file_xxh:
            raise self._fail("file checksum mismatch")
        for unit in self.units:
            for name, stream in unit.streams.items():
                self._drain(f"{unit.name}/{name}", stream)
        for name, extra in self.extras.items():
            self._drain(f"extra {name}", extra)

    def _drain(self, label: str, stream: dict[str, Any]) -> None:
        for _ in self._chunks(label, stream):  # each chunk checked and decoded, then dropped
            pass
