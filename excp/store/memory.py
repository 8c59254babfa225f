"""A store in this process's memory, for tests and for throwaway runs.

It keeps the same rules as the directory store (including refusing ``a`` next to
``a/b``), so code tested against it behaves the same on disk.
"""

from __future__ import annotations

import io
import shutil
import threading
from typing import BinaryIO

from excp.store.base import Store, validate_key, validate_prefix

_CHUNK = 1 << 20

_named: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


class MemoryStore(Store):
    """Values in a dict behind one lock; "durable" means for the life of the process.

    Values are immutable ``bytes``, so handing them out without copying is safe.
    """

    def __init__(self) -> None:
        self._name = ""
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> MemoryStore:
        """The process-wide store called ``name``, made on first use, so that separate
        ``open_store("memory://name")`` calls (a writer and a reader) share data."""
        with _named_lock:
            store = _named.get(name)
            if store is None:
                store = _named[name] = cls()
                store._name = name
            return store

    @property
    def url(self) -> str:
        """``memory://name``; an anonymous store's ``memory://`` opens a new, empty one."""
        return f"memory://{self._name}"

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            value = self._data.get(key)
        if value is None:
            raise self._not_found(key)
        return value

    def open_read(self, key: str) -> BinaryIO:
        return io.BytesIO(self.get(key))

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        validate_key(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            value = bytes(data)
        else:
            buffer = io.BytesIO()
            shutil.copyfileobj(data, buffer, _CHUNK)
            value = buffer.getvalue()
        with self._lock:
            self._refuse_nesting(key)
            self._data[key] = value

    def put_if_absent(self, key: str, data: bytes) -> bool:
        validate_key(key)
        value = bytes(data)
        with self._lock:
            if key in self._data:
                return False
            self._refuse_nesting(key)
            self._data[key] = value
            return True

    def exists(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return key in self._data

    def size(self, key: str) -> int:
        return len(self.get(key))

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._data.pop(key, None)

    def _refuse_nesting(self, key: str) -> None:
        """Raise Conflict where a directory store could not hold ``key``. Caller holds
        the lock."""
        segments = key.split("/")
        above = ("/".join(segments[:i]) for i in range(1, len(segments)))
        below = key + "/"
        if any(k in self._data for k in above) or any(k.startswith(below) for k in self._data):
            raise self._nested(key)
