"""Where a run lives, behind one interface: :class:`Target`, and its store kind.

A target is a store (a directory, ``memory://``, ``s3://``) or an excp service
(``excp://host:port``). The hook, the callbacks and the CLI talk to a Target and never
ask which kind it is. The store kind, :class:`StoreTarget`, is :mod:`excp.api` itself
and lives beside it; the service kind, and :func:`~excp.client.target.open_target`
that picks one for a URL, are the client's (:mod:`excp.client.target`).
:func:`is_service_url` is here so that code below the client (``excp.dcp``) can tell
a service URL from a store URL without opening a connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from excp import api
from excp.api import BaseSpec, Progress, VerifyReport
from excp.bundle import Bundle
from excp.chain import Chain, Commit, Head, PushResult
from excp.codec.params import CodecParams
from excp.codec.pipeline import Reconstruction
from excp.errors import InvalidInput
from excp.place import Place
from excp.store import Store

Checkpoint = str | Path | Bundle | dict
SERVICE_SCHEMES = {"excp": "http", "http": "http", "https": "https"}


def is_service_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in SERVICE_SCHEMES


def service_url(url: str) -> str:
    """``excp://host:port`` (or ``http(s)://host:port[/prefix]``) as the HTTP base URL."""
    parts = urlsplit(url)
    scheme = SERVICE_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise InvalidInput(f"service URL {url!r} is not excp://HOST:PORT or http(s)://HOST:PORT")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class Target(ABC):
    """The operations of :mod:`excp.api`, on a store or through a service."""

    url: str

    @property
    @abstractmethod
    def place(self) -> Place:
        """How messages name this target, and the ``excp ls`` option that reaches it."""

    @abstractmethod
    def push(self, checkpoint: Checkpoint, run: str, *, step: int | None = None,
             params: CodecParams | None = None, base: BaseSpec | None = None, parent: Head | None = None,
             progress: Progress = None, keep_exact: int | None = None) -> tuple[PushResult, Reconstruction]:
        """:func:`excp.api.push`: code ``checkpoint`` against the head and commit it."""

    @abstractmethod
    def restore(self, run: str, step: int | str = "latest", out: str | Path | None = None, *,
                device: str = "cpu", base: BaseSpec | None = None, progress: Progress = None,
                lossy: bool = False) -> Bundle:
        """:func:`excp.api.restore`: reconstruct ``step`` (or ``latest``) on ``device``."""

    @abstractmethod
    def exact_steps(self, run: str) -> list[int]:
        """:func:`excp.api.exact_steps`: the steps that restore bit for bit."""

    @abstractmethod
    def runs(self) -> list[str]:
        """The runs there are (that the token may read)."""

    @abstractmethod
    def commits(self, run: str) -> list[Commit]:
        """The run's commit records in step order."""

    @abstractmethod
    def params(self, run: str) -> CodecParams:
        """The codec parameters the run was created with."""

    @abstractmethod
    def rebuild(self, run: str, out_dir: str | Path, *, base: BaseSpec | None = None,
                progress: Progress = None) -> list[Path]:
        """:func:`excp.api.rebuild`: every checkpoint of the run, in step order."""

    @abstractmethod
    def verify(self, run: str, *, base: BaseSpec | None = None, progress: Progress = None) -> VerifyReport:
        """:func:`excp.api.verify`: every checksum, and every link decodes."""

    @abstractmethod
    def inspect(self, run: str, step: int | str = "latest") -> dict[str, Any]:
        """:func:`excp.api.inspect_archive` of a stored checkpoint."""

    def close(self) -> None:  # noqa: B027 (a store target holds nothing to release)
        """Release connections."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class StoreTarget(Target):
    """A store, used directly: every call is :mod:`excp.api`'s."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url

    @property
    def place(self) -> Place:
        return Place.store(self.url)

    def push(self, checkpoint: Checkpoint, run: str, *, step: int | None = None,
             params: CodecParams | None = None, base: BaseSpec | None = None, parent: Head | None = None,
             progress: Progress = None, keep_exact: int | None = None) -> tuple[PushResult, Reconstruction]:
        return api.push(checkpoint, run, step=step, store=self.store, params=params, base=base,
                        parent=parent, progress=progress, keep_exact=keep_exact)

    def restore(self, run: str, step: int | str = "latest", out: str | Path | None = None, *,
                device: str = "cpu", base: BaseSpec | None = None, progress: Progress = None,
                lossy: bool = False) -> Bundle:
        return api.restore(run, step, out, store=self.store, device=device, base=base, progress=progress,
                           lossy=lossy)

    def exact_steps(self, run: str) -> list[int]:
        return api.exact_steps(run, self.store)

    def runs(self) -> list[str]:
        return api.list_runs(self.store)

    def commits(self, run: str) -> list[Commit]:
        return api.list_commits(run, self.store)

    def params(self, run: str) -> CodecParams:
        return Chain(self.store, run).params()

    def rebuild(self, run: str, out_dir: str | Path, *, base: BaseSpec | None = None,
                progress: Progress = None) -> list[Path]:
        return api.rebuild(run, out_dir, store=self.store, base=base, progress=progress)

    def verify(self, run: str, *, base: BaseSpec | None = None, progress: Progress = None) -> VerifyReport:
        return api.verify(run, store=self.store, base=base, progress=progress)

    def inspect(self, run: str, step: int | str = "latest") -> dict[str, Any]:
        return api.inspect_archive(run=run, step=step, store=self.store)
