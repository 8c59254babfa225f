"""Exact copies of a sharded run's newest ``keep_exact`` steps: every rank's shard, bit for bit.

Store layout, next to the run's (:mod:`excp.sharded.records`)::

    runs/<run>/dcp/exact/ranks/<r:05d>/<step:012d>-<digest>.excp   rank r's exact archive
    runs/<run>/dcp/exact/commits/<step:012d>.json                the step's exact record

Each rank codes its shard against its own link restored on the CPU
(:func:`excp.exact.encode_copy`) and stores the archive beside its link; the
coordinator writes the step's one exact record, naming every rank's archive, with
``put_if_absent`` after the step's commit record. So a step has an exact copy of every
rank or of none: a save that dies before the record leaves the step restorable from its
links, and archives no record names, which ``excp gc`` collects. Retention deletes a
record before its archives.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from excp.bundle import Bundle
from excp.chain import RECORD_VERSION, read_record, validate_step
from excp.errors import NotFound
from excp.exact import apply_stored
from excp.format.container import ArchiveReader
from excp.sharded.records import ShardedCommit, ShardedRun


@dataclass(frozen=True)
class RankCopy:
    """One rank's exact archive: ``link`` is the digest of the rank's link it corrects,
    ``content`` the original shard's :func:`~excp.codec.exact.content_digest`."""

    archive: str
    digest: str
    size: int
    link: str
    content: str


@dataclass(frozen=True)
class ShardedExactCommit:
    """The record that makes a sharded step's exact copy exist, for all its ranks."""

    step: int
    ranks: dict[int, RankCopy]
    created_at: float = field(default_factory=time.time)
    version: int = RECORD_VERSION

    def to_json(self) -> bytes:
        fields = asdict(self)
        fields["ranks"] = [{"rank": r, **asdict(c)} for r, c in sorted(self.ranks.items())]
        return json.dumps(fields, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, label: str) -> ShardedExactCommit:
        def build(fields: dict[str, Any]) -> ShardedExactCommit:
            ranks = {int(entry.pop("rank")): RankCopy(**entry) for entry in fields.pop("ranks")}
            return cls(ranks=ranks, **fields)
        return read_record(data, label, build)

    def corrects(self, commit: ShardedCommit) -> bool:
        """Whether this copy is of ``commit``'s very links, every rank of them."""
        return (self.step == commit.step and self.ranks.keys() == commit.ranks.keys()
                and all(copy.link == commit.ranks[r].digest for r, copy in self.ranks.items()))


class ShardedCopies:
    """The exact copies of one sharded run."""

    def __init__(self, sharded: ShardedRun) -> None:
        self.sharded = sharded
        self.store = sharded.store
        self._prefix = f"runs/{sharded.run}/dcp/exact"

    def archive_key(self, step: int, rank: int, digest: str) -> str:
        return f"{self._prefix}/ranks/{rank:05d}/{step:012d}-{digest}.excp"

    def _record_key(self, step: int) -> str:
        return f"{self._prefix}/commits/{step:012d}.json"

    def _label(self, step: int) -> str:
        return f"run {self.sharded.run!r}, exact copy of step {step}"

    def records(self) -> list[ShardedExactCommit]:
        """Every exact record, in step order."""
        keys = [key for key in self.store.list(f"{self._prefix}/commits/") if key.endswith(".json")]
        return [ShardedExactCommit.from_json(self.store.get(key), f"run {self.sharded.run!r}, {key}")
                for key in keys]

    def of(self, commit: ShardedCommit) -> ShardedExactCommit | None:
        """The exact copy of ``commit``'s step, if one is committed for its very links."""
        try:
            data = self.store.get(self._record_key(validate_step(commit.step)))
        except NotFound:
            return None
        record = ShardedExactCommit.from_json(data, self._label(commit.step))
        return record if record.corrects(commit) else None

    def put(self, record: ShardedExactCommit) -> bool:
        """Write the step's exact record; False if the step already has one."""
        return self.store.put_if_absent(self._record_key(record.step), record.to_json())

    def apply(self, record: ShardedExactCommit, rank: int, lossy: Bundle) -> Bundle:
        """``lossy`` (rank ``rank``'s link, restored on the CPU) made exact by its copy."""
        copy = record.ranks[rank]
        return apply_stored(self.store, copy.archive, copy.size, copy.content, lossy,
                            f"run {self.sharded.run!r} step {record.step} rank {rank} (exact copy)",
                            "load the step lossy")

    def retain(self, keep: int, steps: list[int]) -> list[int]:
        """Delete the exact copies of all but the newest ``keep`` of ``steps`` (the run's
        committed steps, in order), record first; returns the steps whose copy went."""
        kept = set(steps[-keep:]) if keep else set()
        dropped = []
        for record in self.records():
            if record.step not in kept:
                self.store.delete(self._record_key(record.step))
                for copy in record.ranks.values():
                    self.store.delete(copy.archive)
                dropped.append(record.step)
        return dropped

    def garbage(self, commits: list[ShardedCommit]) -> list[str]:
        """What no committed step needs: records (and their archives) whose step is gone
        or holds other links, then exact archives no record names, up to the step before
        the latest (a save may be between the latest step's commit and its exact record)."""
        by_step = {c.step: c for c in commits}
        latest = commits[-1].step if commits else -1
        found, named, stale = [], set(), set()
        for record in self.records():
            archives = {copy.archive for copy in record.ranks.values()}
            commit = by_step.get(record.step)
            if commit is not None and record.corrects(commit):
                named |= archives
            else:
                found.append(self._record_key(record.step))
                stale |= archives
        for key in self.store.list(f"{self._prefix}/ranks/"):
            step = key.rsplit("/", 1)[-1].split("-", 1)[0]
            if key in stale or (key not in named and step.isdigit() and int(step) < latest):
                found.append(key)
        return found

    def verify(self, record: ShardedExactCommit) -> int:
        """Every checksum of ``record``'s archives; returns the bytes checked."""
        for rank, copy in sorted(record.ranks.items()):
            with self.store.open_read(copy.archive) as handle:
                ArchiveReader(handle, copy.size, f"run {self.sharded.run!r} step {record.step} rank "
                              f"{rank} (exact copy)").verify()
        return sum(copy.size for copy in record.ranks.values())
