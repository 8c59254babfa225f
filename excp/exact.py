"""Exact copies beside a run's lossy chain: the newest ``keep_exact`` steps, bit for bit.

Store layout, next to the chain's (:mod:`excp.chain`)::

    runs/<run>/exact/archives/<step:012d>-<digest>.excp   exact archive, written first
    runs/<run>/exact/commits/<step:012d>.json             its record, written last

An exact copy is coded against its step's *restored* link (:mod:`excp.codec.exact`),
so it adds only the difference between the reconstruction and the original; the chain
itself never reads one, and links go on being coded against reconstructions. A copy
exists iff its record exists, and its record names the link archive it corrects
(a copy of a link that is no longer the step's is ignored). The record is written with
``put_if_absent`` after the archive is stored; retention deletes a record before its
archive. So a crash anywhere leaves each step restorable (exactly, or from its link)
and at worst an archive without a record, which ``excp gc`` collects.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import BinaryIO

from excp.bundle import Bundle
from excp.chain import RECORD_VERSION, Commit, archive_digest, read_record, validate_step
from excp.codec.exact import content_digest, decode_exact, encode_exact
from excp.codec.pipeline import Reconstruction
from excp.errors import ChainMismatch, CorruptData, InvalidInput, NotFound
from excp.format.container import ArchiveReader, ArchiveSummary, ArchiveWriter
from excp.store import Store

KIND = "exact"


def validate_keep(keep: int) -> int:
    """A number of exact copies to keep: an integer, 0 or more."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise InvalidInput(f"keep_exact={keep!r}: keep the exact copies of the newest K steps, "
                           "with an integer K >= 0 (0: none)")
    return keep


def on_cpu(recon: Reconstruction | None) -> Reconstruction | None:
    """A parent reconstruction moved to the CPU: an exact copy is coded against its link
    decoded there, as every exact restore decodes it, whatever device pushed it."""
    return None if recon is None else {name: t.cpu() for name, t in recon.items()}


def encode_copy(run: str, bundle: Bundle, lossy: Bundle, link: Commit, level: int,
                out: BinaryIO) -> ArchiveSummary:
    """Code ``bundle`` against ``lossy`` (``link`` restored on the CPU) into ``out``: the
    archive of the step's exact copy, the same whether a store keeps it here or a
    training node sends it to a service."""
    header = {"kind": KIND, "run": run, "step": link.step, "link": link.digest,
              "layout": bundle.layout, "content": content_digest(bundle)}
    writer = ArchiveWriter(out, level=level, symbols=False)
    encode_exact(bundle, lossy, writer, level)
    return writer.finish(header)


def _copy_header(reader: ArchiveReader, link: Commit, run: str) -> dict:
    """An uploaded copy's header, checked against the link it must correct: every
    checksum first, then that it is an exact copy of this very link."""
    reader.verify()
    header = reader.header
    if header.get("kind") != KIND or not isinstance(header.get("content"), str):
        raise InvalidInput(f"{reader.label}: not an exact copy; code it with excp.exact.encode_copy")
    if header.get("run") != run or header.get("step") != link.step:
        raise InvalidInput(f"{reader.label}: the copy is of run {header.get('run')!r} step "
                           f"{header.get('step')!r}; upload it under its own run and step")
    if header.get("link") != link.digest:
        raise ChainMismatch(f"{reader.label}: the copy corrects link {header.get('link')!r}, but step "
                            f"{link.step} is committed as link {link.digest}; code it against that link")
    return header


@dataclass(frozen=True)
class ExactCommit:
    """The record that makes a step's exact copy exist. ``link`` is the digest of the
    link archive it corrects; ``content`` the original's :func:`content_digest`."""

    step: int
    archive: str
    digest: str
    size: int
    link: str
    content: str
    created_at: float
    version: int = RECORD_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, label: str) -> ExactCommit:
        return read_record(data, label, lambda fields: cls(**fields))


def apply_stored(store: Store, archive: str, size: int, content: str, lossy: Bundle, label: str,
                 instead: str) -> Bundle:
    """``lossy`` made exact by the stored copy ``archive`` (``size`` bytes, of the original
    whose content digest is ``content``); ``instead`` is what to do when it is missing."""
    try:
        stored = store.size(archive)
    except NotFound:
        raise CorruptData(f"{label}: archive {archive} is missing; {instead}") from None
    if stored != size:
        raise CorruptData(f"{label}: archive is {stored} bytes, its record says {size}")
    with store.open_read(archive) as handle:
        return decode_exact(ArchiveReader(handle, size, label), lossy, content)


class ExactCopies:
    """The exact copies of one run in one store."""

    def __init__(self, store: Store, run: str) -> None:
        self.store = store
        self.run = run
        self._prefix = f"runs/{run}/exact"

    def _record_key(self, step: int) -> str:
        return f"{self._prefix}/commits/{step:012d}.json"

    def records(self) -> list[ExactCommit]:
        """Every exact record, in step order."""
        keys = [key for key in self.store.list(f"{self._prefix}/commits/") if key.endswith(".json")]
        return [ExactCommit.from_json(self.store.get(key), f"run {self.run!r}, exact copy record {key}")
                for key in keys]

    def of(self, commit: Commit) -> ExactCommit | None:
        """The exact copy of ``commit``'s step, if one is committed for that very link."""
        try:
            data = self.store.get(self._record_key(validate_step(commit.step)))
        except NotFound:
            return None
        record = ExactCommit.from_json(data, f"run {self.run!r}, exact copy of step {commit.step}")
        return record if record.link == commit.digest else None

    def write(self, bundle: Bundle, lossy: Bundle, link: Commit, level: int) -> ExactCommit | None:
        """Store and commit the exact copy of ``link``'s step: ``bundle`` coded against
        ``lossy``, the link's restore. None if another writer committed one first, or
        if ``excp gc`` took the archive before its record was written."""
        with tempfile.TemporaryFile() as spool:
            summary = encode_copy(self.run, bundle, lossy, link, level, spool)
            return self._commit(spool, link, summary.digest, summary.size, summary.header["content"])

    def commit_archive(self, archive: BinaryIO, link: Commit) -> tuple[ExactCommit, bool]:
        """Store and commit an uploaded copy of ``link``'s step (untrusted: every checksum
        is verified, and its header must name ``link``, the step's committed link).
        Returns the record and whether it was created (False: the step already had one)."""
        size = archive.seek(0, io.SEEK_END)
        archive.seek(0)
        label = f"run {self.run!r} step {link.step} (exact copy upload)"
        header = _copy_header(ArchiveReader(archive, size, label), link, self.run)
        existing = self.of(link)
        if existing is not None:
            return existing, False
        record = self._commit(archive, link, archive_digest(archive), size, header["content"])
        if record is None:
            existing = self.of(link)
            if existing is None:
                raise ChainMismatch(f"{label}: another copy of step {link.step} was committed for another "
                                    "link meanwhile; restore the step and push it again")
            return existing, False
        return record, True

    def _commit(self, archive: BinaryIO, link: Commit, digest: str, size: int,
                content: str) -> ExactCommit | None:
        """Store ``archive`` as ``link``'s copy, then write its record (see :meth:`write`)."""
        key = f"{self._prefix}/archives/{link.step:012d}-{digest}.excp"
        archive.seek(0)
        self.store.put(key, archive)
        record = ExactCommit(link.step, key, digest, size, link.digest, content, time.time())
        if not self.store.put_if_absent(self._record_key(link.step), record.to_json()):
            return None
        if not self.store.exists(key):
            self.store.delete(self._record_key(link.step))
            return None
        return record

    def adopt(self, record: ExactCommit, archive: BinaryIO) -> None:
        """Store a copy and its record exactly as another store holds them: how a client
        mirrors a step's exact copy from a service."""
        if not record.archive.startswith(f"{self._prefix}/archives/"):
            raise CorruptData(f"run {self.run!r} step {record.step}: exact archive key {record.archive!r} "
                              "is outside the run")
        archive.seek(0)
        self.store.put(record.archive, archive)
        self.store.put_if_absent(self._record_key(validate_step(record.step)), record.to_json())

    def apply(self, record: ExactCommit, lossy: Bundle) -> Bundle:
        """``lossy`` (the step's link, restored on the CPU) made exact by ``record``'s copy."""
        return apply_stored(self.store, record.archive, record.size, record.content, lossy,
                            f"run {self.run!r} step {record.step} (exact copy)", "restore with --lossy")

    def retain(self, keep: int, steps: list[int]) -> list[int]:
        """Delete the exact copies of all but the newest ``keep`` of ``steps`` (the run's
        committed steps, in order), record first; returns the steps whose copy went."""
        kept = set(steps[-keep:]) if keep else set()
        dropped = []
        for record in self.records():
            if record.step not in kept:
                self.store.delete(self._record_key(record.step))
                self.store.delete(record.archive)
                dropped.append(record.step)
        return dropped

    def drop(self, step: int) -> None:
        """Delete ``step``'s exact copy, record first (the step's link was deleted: a copy
        of it is no use, and its record would keep a re-pushed step from getting its own)."""
        try:
            record = ExactCommit.from_json(self.store.get(self._record_key(validate_step(step))),
                                           f"run {self.run!r}, exact copy of step {step}")
        except NotFound:
            return
        self.store.delete(self._record_key(step))
        self.store.delete(record.archive)

    def garbage(self, commits: list[Commit]) -> list[str]:
        """What no committed link needs: records (and their archives) of a link that is
        no longer its step's (a delete that died before :meth:`drop`), then exact
        archives no record names, up to the step before the head (a push may be writing
        the head's copy: it is collected once a later step is committed)."""
        links = {c.step: c.digest for c in commits}
        head = commits[-1].step if commits else -1
        found, named, stale = [], set(), set()
        for record in self.records():
            if links.get(record.step) == record.link:
                named.add(record.archive)
            else:
                found.append(self._record_key(record.step))
                stale.add(record.archive)
        for key in self.store.list(f"{self._prefix}/archives/"):
            step = key.rsplit("/", 1)[-1].split("-", 1)[0]
            if key in stale or (key not in named and step.isdigit() and int(step) < head):
                found.append(key)
        return found

    def verify(self, record: ExactCommit) -> None:
        """Every checksum of ``record``'s archive."""
        with self.store.open_read(record.archive) as handle:
            ArchiveReader(handle, record.size, f"run {self.run!r} step {record.step} (exact copy)").verify()
