"""A store in a local (or network-mounted) directory, one file per key.

Atomicity comes from the file system: a value is written to a temp file beside its
final name and then moved (``os.replace``) or hard-linked (``os.link``, which fails if
the target exists) into place, so a reader never opens a half-written file and two
committers cannot both win. Directories exist only while they hold keys, as in S3.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from excp.errors import InvalidInput, StoreUnavailable
from excp.store.base import RESERVED_PREFIX, Store, is_key, validate_key, validate_prefix

_CHUNK = 1 << 20
_ABSENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_TEMP_ATTEMPTS = 8


class LocalStore(Store):
    """Keys map to files under ``root``; ``a/b`` is the file ``root/a/b``.

    Safe for concurrent threads and processes on one machine, and on network file
    systems whose rename and link are atomic (NFSv3+, not every FUSE mount).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            # Refused here, since reading through a file finds nothing: ``excp ls`` would
            # print no runs and a restore would say the run does not exist.
            what = "a file" if os.path.isfile(self.root) else "not a directory"
            raise InvalidInput(f"store path {self.root} is {what}, not a store directory: pass the "
                               "directory that holds runs/ (or a new path, made on the first push)")

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._reading(key, path):
            return path.read_bytes()

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        with self._reading(key, path):
            return open(path, "rb")  # the caller closes it

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        path = self._path(key)
        with self._writing(key, path):
            tmp = self._write_temp(path.parent, data)
            try:
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._writing(key, path):
            tmp = self._write_temp(path.parent, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.is_dir():
                    raise self._nested(key) from None
                return False
            finally:
                tmp.unlink()
            _fsync_dir(path.parent)
            return True

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise self._not_found(key)
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        head, _, tail = validate_prefix(prefix).rpartition("/")
        start = self.root / head
        keys = []
        try:
            for dirpath, dirnames, filenames in os.walk(start, onerror=_raise_unless_gone):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                if dirpath == str(start):
                    # Only the first level can miss the prefix; skip whole other runs.
                    dirnames[:] = [d for d in dirnames if d.startswith(tail)]
                for name in filenames:
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix) and is_key(key):
                        keys.append(key)
        except OSError as err:
            raise _unavailable(start, err) from err
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._writing(key, path):
            try:
                os.unlink(path)
            except OSError:
                if path.is_file():
                    raise
                return  # nothing is stored under this key
            _fsync_dir(path.parent)
            self._prune(path.parent)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _stat(self, key: str) -> os.stat_result | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except _ABSENT:
            return None
        except OSError as err:
            raise _unavailable(path, err) from err
        return st if stat.S_ISREG(st.st_mode) else None

    @contextmanager
    def _reading(self, key: str, path: Path) -> Iterator[None]:
        try:
            yield
        except _ABSENT as err:
            raise self._not_found(key) from err
        except OSError as err:
            raise _unavailable(path, err) from err

    @contextmanager
    def _writing(self, key: str, path: Path) -> Iterator[None]:
        try:
            yield
        except (NotADirectoryError, IsADirectoryError) as err:
            raise self._nested(key) from err
        except OSError as err:
            raise _unavailable(path, err) from err

    def _write_temp(self, directory: Path, data: bytes | BinaryIO) -> Path:
        """Write ``data`` durably to a new temp file in ``directory``, ready to move."""
        fd, tmp = self._create_temp(directory)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    out.write(data)
                else:
                    shutil.copyfileobj(data, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _create_temp(self, directory: Path) -> tuple[int, Path]:
        # A concurrent delete may prune ``directory`` between making it and creating
        # the temp file; once the temp file exists the directory is safe, so retry.
        for _ in range(_TEMP_ATTEMPTS):
            tmp = directory / f"{RESERVED_PREFIX}{secrets.token_hex(16)}"
            try:
                self._ensure_dir(directory)
                # 0o666 rather than mkstemp's 0o600, so the umask decides who may read.
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
            except FileNotFoundError:
                continue
        raise FileNotFoundError(errno.ENOENT, "directory keeps disappearing", str(directory))

    def _ensure_dir(self, directory: Path) -> None:
        """``mkdir -p`` that fsyncs each parent it touches, so a committed key cannot be
        lost in a crash with a directory entry that never reached the disk."""
        if directory.is_dir():
            return
        self._ensure_dir(directory.parent)
        try:
            os.mkdir(directory)
        except FileExistsError:
            if directory.is_dir():
                pass  # made by a concurrent writer; fsync anyway, it may not have yet
            elif self.root in directory.parents:  # a key is in the way: ``a`` for ``a/b``
                raise NotADirectoryError(errno.ENOTDIR, "is a key", str(directory)) from None
            else:
                raise StoreUnavailable(
                    f"cannot make store directory {self.root}: {directory} is not a directory"
                ) from None
        _fsync_dir(directory.parent)

    def _prune(self, directory: Path) -> None:
        """Remove directories emptied by a delete, so ``a`` can be stored after ``a/b``
        is deleted, as in every other backend. Best effort: stop at the first failure."""
        while directory != self.root:
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = directory.parent


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_unless_gone(err: OSError) -> None:
    """os.walk error hook: a directory pruned mid-walk (or never made) holds no keys."""
    if not isinstance(err, (FileNotFoundError, NotADirectoryError)):
        raise err


def _unavailable(path: Path, err: OSError) -> StoreUnavailable:
    code = errno.errorcode.get(err.errno or 0, "unknown errno")
    return StoreUnavailable(
        f"store file {path}: {err.strerror or err} ({code}); check the store directory "
        "exists, is writable and is not full"
    )
