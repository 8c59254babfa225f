"""The contract every store backend keeps: opaque bytes under '/'-separated keys.

The store knows nothing about checkpoints. Chains are built on two of its promises
only: ``put`` never exposes a partial value, and ``put_if_absent`` lets exactly one
of several racing writers create a key (see docs/design.md, "Store layout").
"""

from __future__ import annotations

import abc
import re
from typing import BinaryIO

from excp.errors import Conflict, InvalidInput, NotFound

MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
"""Every common file system refuses longer names, so no backend may accept them."""

RESERVED_PREFIX = ".tmp-"
"""Segments starting with this are the backends' in-flight writes, never keys."""

_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
_PARTIAL_SEGMENT = re.compile(r"[A-Za-z0-9._=-]*")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if every backend can store it, else raise InvalidInput.

    One rule set for all backends keeps a run portable between a directory, memory and
    S3, and keeps keys from escaping a directory (``..``) or hiding (``.tmp-``).
    """
    problem = _key_problem(key)
    if problem is not None:
        raise InvalidInput(f"invalid store key {key!r}: {problem}")
    return key


def is_key(name: str) -> bool:
    """Whether ``name`` is a valid key: backends skip what they find in storage that no
    key can name (temp files, directory markers, other tools' objects)."""
    return _key_problem(name) is None


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if some valid key could start with it.

    Its complete segments must form a valid key; the trailing partial segment may be
    anything made of key characters (``runs/r1/commits/0000`` is a fine prefix).
    """
    head, slash, tail = prefix.rpartition("/")
    problem = None
    if slash:
        problem = _key_problem(head) if head else "no leading '/'"
    if problem is None and not _PARTIAL_SEGMENT.fullmatch(tail):
        problem = "only A-Z a-z 0-9 . _ = - are allowed"
    if problem is not None:
        raise InvalidInput(f"invalid store key prefix {prefix!r}: {problem}")
    return prefix


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "a key is a non-empty string"
    if len(key) > MAX_KEY_LENGTH:
        return f"at most {MAX_KEY_LENGTH} characters"
    if key.startswith("/") or key.endswith("/"):
        return "no leading or trailing '/'"
    for segment in key.split("/"):
        if not segment:
            return "no empty segment ('//')"
        if segment in (".", ".."):
            return "no '.' or '..' segment"
        if not _SEGMENT.fullmatch(segment):
            return "only A-Z a-z 0-9 . _ = - and '/' between segments are allowed"
        if len(segment) > MAX_SEGMENT_LENGTH:
            return f"at most {MAX_SEGMENT_LENGTH} characters between slashes"
        if segment.startswith(RESERVED_PREFIX):
            return f"segments starting with {RESERVED_PREFIX!r} are reserved"
    return None


class Store(abc.ABC):
    """A flat key/value store of opaque bytes, the only persistence excp uses.

    Callers may assume:

    1) Every key is checked by :func:`validate_key` before storage is touched; a bad
       key raises InvalidInput and changes nothing.
    2) ``put`` is atomic: a concurrent ``get``/``open_read`` sees the whole old value
       or the whole new one. Once ``put`` or a ``put_if_absent`` that returned True
       has returned, the value is durable and visible to every later call on every
       store opened on the same ``url``, in this process or another.
    3) ``put_if_absent`` is the commit primitive: of any number of concurrent calls
       for one absent key, exactly one returns True and its value is the one stored;
       the others return False and change nothing.
    4) A stream from ``open_read`` reads the one value that existed when it was
       opened, even if the key is overwritten or deleted meanwhile.
    5) ``list`` is sorted and holds every key whose write returned before the call
       and that was not deleted since; a key being written concurrently may or may
       not appear, but never with a partial value.
    6) A missing key raises NotFound; a backend failure raises StoreUnavailable.

    Callers must not:

    * store a key and a key beneath it (``a`` and ``a/b``): a directory cannot hold
      both, so every backend raises Conflict for the second one;
    * expect atomicity across keys: a checkpoint is made consistent by writing its
      archive with ``put`` first and its commit record with ``put_if_absent`` last.

    Implementers must pass every key through :func:`validate_key` (and every list
    prefix through :func:`validate_prefix`) before touching storage, keep the
    promises above against other threads and other processes sharing the store, and
    raise only the excp errors named here.
    """

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the store lives, as a URL that ``open_store`` accepts; it opens this same
        store again (except for an anonymous ``memory://`` store)."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole value of ``key``; for small values (records, run.json).

        Raises NotFound if ``key`` is absent.
        """

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable, seekable binary stream over the value of ``key``, to be used as
        a context manager, so archives are read without holding them whole.

        Raises NotFound if ``key`` is absent.
        """

    @abc.abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Create or replace ``key`` atomically.

        A file object is copied from its current position to its end in bounded
        chunks, never read whole, so a checkpoint is never held twice in memory.
        """

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` atomically unless it exists; True if this call created it.

        On False nothing changed: the value stored is the one the winner wrote.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a value (a key only used as a prefix does not)."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The length in bytes of the value of ``key``; NotFound if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix`` (plain string prefix), sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error, so garbage
        collection can be rerun after a crash."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _not_found(self, key: str) -> NotFound:
        return NotFound(f"no key {key!r} in store {self.url}; run `excp ls` to see what it holds")

    def _nested(self, key: str) -> Conflict:
        return Conflict(
            f"cannot store key {key!r} in {self.url}: a key and a key beneath it "
            "('a' and 'a/b') cannot both exist"
        )
