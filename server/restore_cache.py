"""A bounded on-disk LRU of reconstructed checkpoint files.

Never the source of truth: an entry's name is a hash of the store, the run, the output
format and the archive digests of every commit the restore decodes, read from the
store's commit records on every request. A deleted, re-pushed or tampered-with step
therefore has a different name, and a stale entry is simply never asked for again
(and ages out). Files are written under a temporary name and renamed into place, so a
reader never sees half a file; a reader opens its file before anything is evicted, and
an evicted file stays readable through an open handle, so eviction never cuts a
download short.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

_PARTIAL = ".part"


class RestoreCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"*{_PARTIAL}"):  # from a server killed mid-write
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    @staticmethod
    def key(store_url: str, run: str, fmt: str, digests: Sequence[str], base: object) -> str:
        """The entry name for a restore; ``digests`` are the archives decoded, in order,
        ``base`` the run's seed base (or None)."""
        ident = json.dumps([store_url, run, fmt, list(digests), base], sort_keys=True, default=str)
        return hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key

    def open(self, key: str) -> BinaryIO | None:
        """The cached file, opened, marked as just used; None if absent."""
        path = self._path(key)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # evicted since we opened it; the handle still reads it
        return handle

    def staging(self) -> Path:
        """A fresh path to write an entry (a file or a directory) to, then :meth:`commit`."""
        return self.root / f"{secrets.token_hex(8)}{_PARTIAL}"

    def commit(self, key: str, staged: Path) -> BinaryIO:
        """Move ``staged`` into place as ``key``, open it, then evict down to the bound
        (which may evict this very entry: the caller still streams it)."""
        path = self._path(key)
        os.replace(staged, path)
        handle = open(path, "rb")
        self.evict()
        return handle

    def discard(self, staged: Path) -> None:
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every complete entry, least recently used first."""
        entries = []
        for path in self.root.iterdir():
            if path.name.endswith(_PARTIAL):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        return sorted(entries)

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self) -> None:
        """Delete least recently used entries until the total is within the bound."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
