"""The service kind of :class:`~excp.target.Target`, and :func:`open_target`, which
picks the kind a URL names.

With a service, the training node still does the compute: it codes each archive
against the head's reconstruction and uploads it (the service verifies and commits
it), and it restores by downloading the archives on the step's path and decoding them
locally, on its own device — so a restore onto a GPU decodes on that GPU, and
``rebuild``/``verify`` decode each link once and check exactly the bytes the client
received. The downloaded archives go into a temporary directory store (a *mirror* of
the run's commit records and the archives needed), where the ordinary chain code
reads them; its messages name the service, not the mirror.

A run that keeps exact copies gets them the same way: after uploading a link, the
node codes the step's exact copy against that link as restored on the CPU
(:func:`excp.exact.encode_copy`, as :func:`excp.api.push` does for a store) and uploads
it; an exact restore downloads the copy beside the step's links.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from excp import api
from excp.api import BaseSpec, Progress, VerifyReport
from excp.bundle import Bundle
from excp.cache import ReconCache
from excp.chain import Chain, Commit, Head, PushResult, encode_archive, recon_digest, validate_run
from excp.client.http import Client, RunInfo
from excp.codec.params import CodecParams
from excp.codec.pipeline import Reconstruction, decode_archive
from excp.errors import ChainMismatch, InvalidInput, NotFound
from excp.exact import ExactCopies, encode_copy, on_cpu, validate_keep
from excp.format.container import ArchiveReader
from excp.place import Place
from excp.store import LocalStore, Store, open_store
from excp.target import Checkpoint, StoreTarget, Target, is_service_url

CLIENT_OPTIONS = {"timeout", "retries", "backoff", "max_backoff", "retry_refused"}


class ServiceTarget(Target):
    """An excp service: archives are coded and decoded here, stored there."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.url = client.url

    @property
    def place(self) -> Place:
        return Place.service(self.url)

    def close(self) -> None:
        self.client.close()

    def push(self, checkpoint: Checkpoint, run: str, *, step: int | None = None,
             params: CodecParams | None = None, base: BaseSpec | None = None, parent: Head | None = None,
             progress: Progress = None, keep_exact: int | None = None) -> tuple[PushResult, Reconstruction]:
        if keep_exact is not None:
            validate_keep(keep_exact)
        bundle = api.to_bundle(checkpoint)
        step = bundle.step if step is None else step
        if step is None:
            raise InvalidInput("this checkpoint does not say its step: pass --step N")
        info = self._ensure_run(validate_run(run), params, base, keep_exact)
        head = info.head
        cache = ReconCache(self.url, run)
        parent_of = api.head_recon(parent, cache, lambda commit: self._decoded(run, commit.step, base))
        used: list[Reconstruction] = []

        def coded_against(commit: Commit) -> Reconstruction:
            used.append(parent_of(commit))
            return used[-1]

        first = self._first_parent(info, base) if head is None else None
        with tempfile.TemporaryFile() as spool:
            _, recon = encode_archive(run, info.params, head, bundle, step, spool, coded_against, first,
                                      progress)
            result = self.client.upload_archive(run, step, spool)
            if info.keep_exact and info.params.mode != "lossless":
                self._keep_exact_copy(info, bundle, result, spool, used[-1] if used else first, base)
        if not result.created:
            return result, {}
        cache.put(step, result.commit.digest, recon)
        return result, recon

    def _keep_exact_copy(self, info: RunInfo, bundle: Bundle, result: PushResult, archive: BinaryIO,
                         parent: Reconstruction | None, base: BaseSpec | None) -> None:
        """Upload the exact copy of the step just pushed, coded against its link as
        restored on the CPU: decoded from ``archive`` (the link uploaded) and the
        reconstruction it was coded against. A step pushed again gets its copy only if
        it lacks one and is still among the run's newest ``keep_exact``; the service
        drops the copies beyond those."""
        run, commit = info.name, result.commit
        if result.created:
            size = archive.seek(0, io.SEEK_END)
            reader = ArchiveReader(archive, size, f"run {run!r} step {commit.step}")
            lossy, _ = decode_archive(reader, on_cpu(parent), "cpu", weights_only=False)
        else:
            steps = [c.step for c in self.client.checkpoints(run)]
            if commit.step not in steps[-info.keep_exact:] or commit.step in self.exact_steps(run):
                return
            lossy = self.restore(run, commit.step, base=base, lossy=True)
        with tempfile.TemporaryFile() as spool:
            encode_copy(run, bundle, lossy, commit, info.params.zstd_level, spool)
            self.client.upload_exact(run, commit.step, spool)

    def _ensure_run(self, run: str, params: CodecParams | None, base: BaseSpec | None,
                    keep_exact: int | None) -> RunInfo:
        try:
            info = self.client.run(run)
        except NotFound:
            options = (params or CodecParams()).to_dict()
            seed_base = None if base is None else (base.seed, base.factory)
            return self.client.create_run(run, "default", options, seed_base, keep_exact or 0)
        api.check_options(run, info.params, info.base, params, base)
        api.check_keep_exact(run, info.keep_exact, keep_exact)
        return info

    @staticmethod
    def _first_parent(info: RunInfo, base: BaseSpec | None) -> Reconstruction | None:
        """The base the first link is coded against: rebuilt here, and the same weights
        the service rebuilt when it created the run (else the archive would be coded
        against other weights than every restore uses)."""
        if base is None:
            return None
        recon = api.build_base(base)
        if info.base is not None and recon_digest(recon) != info.base.digest:
            raise ChainMismatch(f"run {info.name!r}: the base weights rebuilt here from {base.factory} "
                                f"(seed {base.seed}) differ from the service's; use the same code there")
        return recon

    def _decoded(self, run: str, step: int, base: BaseSpec | None) -> Reconstruction:
        """The reconstruction of ``step``, decoded here from downloaded archives."""
        with self._mirror(run) as chain:
            self._fetch(chain, chain.path_to(step))
            _, recon = chain.restore(step, base_recon=api.build_base(base) if base else None)
        return recon

    @contextmanager
    def _mirror(self, run: str) -> Iterator[Chain]:
        """A temporary store with the run's record and every commit record; archives
        are added by :meth:`_fetch` as needed."""
        info = self.client.run(validate_run(run))
        with tempfile.TemporaryDirectory(prefix="excp-mirror-") as root:
            chain = Chain(LocalStore(root), run, self.place)
            chain.create(info.params, info.base, keep_exact=info.keep_exact)
            for commit in self.client.checkpoints(run):
                chain.adopt(commit)
            yield chain

    def _fetch(self, chain: Chain, commits: list[Commit]) -> None:
        for commit in commits:
            with tempfile.TemporaryFile() as spool:
                self.client.download_archive(chain.run, commit, spool)
                chain.adopt(commit, spool)

    def restore(self, run: str, step: int | str = "latest", out: str | Path | None = None, *,
                device: str = "cpu", base: BaseSpec | None = None, progress: Progress = None,
                lossy: bool = False) -> Bundle:
        with self._mirror(run) as chain:
            number = chain.resolve(step)
            self._fetch(chain, chain.path_to(number))
            if not lossy:
                self._fetch_exact(chain, [chain.commit(number)])
            return api.restore(run, number, out, store=chain.store, device=device, base=base,
                               progress=progress, lossy=lossy)

    def _fetch_exact(self, chain: Chain, commits: list[Commit]) -> None:
        """Mirror the exact copies the service has of these commits' links."""
        links = {(c.step, c.digest) for c in commits}
        for record in self.client.run(chain.run).exact:
            if (record.step, record.link) in links:
                with tempfile.TemporaryFile() as spool:
                    self.client.download_exact(chain.run, record, spool)
                    ExactCopies(chain.store, chain.run).adopt(record, spool)

    def exact_steps(self, run: str) -> list[int]:
        """The steps with an exact copy of their link, and every step of a lossless-mode run."""
        info = self.client.run(validate_run(run))
        if info.params.mode == "lossless":
            return [c.step for c in self.commits(run)]
        return [record.step for record in info.exact]

    def runs(self) -> list[str]:
        return self.client.runs()

    def commits(self, run: str) -> list[Commit]:
        return self.client.checkpoints(validate_run(run))

    def params(self, run: str) -> CodecParams:
        return self.client.run(validate_run(run)).params

    def rebuild(self, run: str, out_dir: str | Path, *, base: BaseSpec | None = None,
                progress: Progress = None) -> list[Path]:
        with self._mirror(run) as chain:
            self._fetch(chain, chain.commits())
            return api.rebuild(run, out_dir, store=chain.store, base=base, progress=progress)

    def verify(self, run: str, *, base: BaseSpec | None = None, progress: Progress = None) -> VerifyReport:
        with self._mirror(run) as chain:
            self._fetch(chain, chain.commits())
            self._fetch_exact(chain, chain.commits())
            return api.verify(run, store=chain.store, base=base, progress=progress)

    def inspect(self, run: str, step: int | str = "latest") -> dict[str, Any]:
        with self._mirror(run) as chain:
            commit = chain.commit(chain.resolve(step))
            self._fetch(chain, [commit])
            return api.inspect_archive(run=run, step=commit.step, store=chain.store)


def open_target(url: str | Store | Target | None = None, token: str | None = None,
                **client_options: Any) -> Target:
    """The target a URL names: ``excp://host:port`` or ``http(s)://host:port`` is a
    service (``token``, else ``$EXCP_TOKEN``); anything else is a store URL as
    :func:`excp.store.open_store` takes it (``None``: ``$EXCP_STORE`` or ``./excp-store``).
    ``client_options`` go to :class:`~excp.client.http.Client` (timeout, retries, backoff)."""
    unknown = sorted(set(client_options) - CLIENT_OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown option {unknown[0]!r}: a service client takes {sorted(CLIENT_OPTIONS)}")
    if isinstance(url, Target):
        return url
    service = isinstance(url, str) and is_service_url(url)
    if not service and (token is not None or client_options):
        given = "a token" if token is not None else f"{sorted(client_options)[0]}="
        raise InvalidInput(f"{given} is for an excp service (excp://HOST:PORT); a store takes none")
    if isinstance(url, Store):
        return StoreTarget(url)
    if service:
        return ServiceTarget(Client(url, token, **client_options))
    return StoreTarget(open_store(url))
