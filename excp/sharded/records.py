"""Where a sharded run lives in a store, and the record that makes a step exist.

Layout (next to an ordinary run's, under the same ``runs/<run>/``)::

    runs/<run>/run.json                                      params, "kind": "sharded"
    runs/<run>/dcp/ranks/<r:05d>/<step:012d>-<digest>.excp     rank r's archive of the step
    runs/<run>/dcp/ranks/<r:05d>/<step:012d>-<digest>.json     its record (a Commit)
    runs/<run>/dcp/steps/<step:012d>/metadata-<digest>.pt      DCP's Metadata
    runs/<run>/dcp/commits/<step:012d>.json                  the step's commit record
    runs/<run>/dcp/exact/...                                 exact copies (excp.sharded.exact)

Each rank writes its archive and its record (keys named by content, so a retried or
crashed attempt never overwrites another's bytes); the coordinator writes DCP's
metadata and then, with ``put_if_absent``, the commit record that names every rank's
archive. A step exists iff its commit record does, so it is all ranks or nothing.
Every rank keeps a chain of its own: its entry in step S names its parent step, whose
commit record holds the rank's archive it was coded against.

Keys are rank-major so that the burst of a save (every rank writing at once) spreads
over one prefix per rank, each written a few times per checkpoint, rather than all
landing on one new prefix per step: object stores partition and rate-limit by key
prefix (S3: about 3,500 writes/s per partition).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from excp.chain import RECORD_VERSION, Chain, Commit, path_back, read_record, validate_step
from excp.errors import CorruptData, InvalidInput, NotFound
from excp.store import Store

KIND = "sharded"
_METADATA_CLASSES = [dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata,
                     dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
                     dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
                     dcp_metadata._MEM_FORMAT_ENCODING]


@dataclass(frozen=True)
class ShardedCommit:
    """One step of a sharded run: every rank's archive (as the rank's own ``Commit``)
    and DCP's metadata."""

    step: int
    world_size: int
    ranks: dict[int, Commit]
    metadata: str
    metadata_size: int
    created_at: float = field(default_factory=time.time)
    version: int = RECORD_VERSION

    @property
    def size(self) -> int:
        return self.metadata_size + sum(c.size for c in self.ranks.values())

    @property
    def raw_bytes(self) -> int:
        return sum(c.raw_bytes for c in self.ranks.values())

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.size, 1)

    def summary(self) -> Commit:
        """The step as one row of ``excp ls``: sizes summed over ranks, a keyframe if every
        rank coded one, the parent of rank 0; no single archive or digest."""
        first = self.ranks[min(self.ranks)]
        return Commit(step=self.step, archive=self.metadata, digest="", size=self.size, parent=first.parent,
                      keyframe=all(c.keyframe for c in self.ranks.values()),
                      depth=max(c.depth for c in self.ranks.values()),
                      num_parameters=sum(c.num_parameters for c in self.ranks.values()),
                      raw_bytes=self.raw_bytes, input_digest="", created_at=self.created_at)

    def to_json(self) -> bytes:
        fields = asdict(self)
        fields["ranks"] = [{"rank": r, **asdict(c)} for r, c in sorted(self.ranks.items())]
        return json.dumps(fields, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, label: str) -> ShardedCommit:
        def build(fields: dict[str, Any]) -> ShardedCommit:
            ranks = {int(entry.pop("rank")): Commit(**entry) for entry in fields.pop("ranks")}
            return cls(ranks=ranks, **fields)
        return read_record(data, label, build)


def _step(key: str) -> int | None:
    """The step a key of this layout belongs to (``ranks/<r>/<step>-…`` or ``steps/<step>/…``)."""
    parts = key.split("/")
    name = parts[-2] if parts[-3] == "steps" else parts[-1].split("-", 1)[0]
    return int(name) if name.isdigit() else None


class ShardedRun:
    """A sharded run in a store: its records and keys (the run itself is a Chain's
    ``run.json`` with ``kind: sharded``)."""

    def __init__(self, store: Store, run: str) -> None:
        self.chain = Chain(store, run)
        self.store, self.run = store, self.chain.run
        self._prefix = f"runs/{self.run}/dcp"

    # --- keys ----------------------------------------------------------------------

    def archive_key(self, step: int, rank: int, digest: str) -> str:
        return f"{self._prefix}/ranks/{rank:05d}/{step:012d}-{digest}.excp"

    def rank_record_key(self, step: int, rank: int, digest: str) -> str:
        return f"{self._prefix}/ranks/{rank:05d}/{step:012d}-{digest}.json"

    def metadata_key(self, step: int, digest: str) -> str:
        return f"{self._prefix}/steps/{step:012d}/metadata-{digest}.pt"

    def _commit_key(self, step: int) -> str:
        return f"{self._prefix}/commits/{step:012d}.json"

    # --- the run -------------------------------------------------------------------

    def is_sharded(self) -> bool:
        return self.chain.config().get("kind") == KIND

    def ensure(self, params: Any, keep_exact: int = 0) -> None:
        """Create the run as a sharded one, or check that it is one."""
        if not self.chain.exists():
            self.chain.create(params, None, kind=KIND, keep_exact=keep_exact)
        if not self.is_sharded():
            raise InvalidInput(f"run {self.run!r} holds ordinary checkpoints, not "
                               "torch.distributed.checkpoint saves: save to a new run name")

    # --- commits -------------------------------------------------------------------

    def commits(self) -> list[ShardedCommit]:
        keys = self.store.list(f"{self._prefix}/commits/")
        return [self._read(key) for key in keys if key.endswith(".json")]

    def _read(self, key: str) -> ShardedCommit:
        return ShardedCommit.from_json(self.store.get(key), f"run {self.run!r}, {key.rsplit('/', 1)[-1]}")

    def commit(self, step: int) -> ShardedCommit:
        key = self._commit_key(validate_step(step))
        try:
            return self._read(key)
        except NotFound:
            raise NotFound(f"run {self.run!r} has no step {step}: list its steps with "
                           f"{self.chain.place.listing(self.run)}") from None

    def has(self, step: int) -> bool:
        return self.store.exists(self._commit_key(validate_step(step)))

    def resolve(self, step: int | str) -> ShardedCommit:
        if step == "latest":
            keys = self.store.list(f"{self._prefix}/commits/")
            if not keys:
                self.chain.config()
                raise NotFound(f"run {self.run!r} has no checkpoints yet")
            return self._read(keys[-1])
        try:
            return self.commit(int(step))
        except (TypeError, ValueError):
            raise InvalidInput(f"invalid step {step!r}: use a number or 'latest'") from None

    def garbage(self) -> list[str]:
        """Rank archives, rank records and metadata of steps up to the latest committed
        one that no commit record names (a save a rank died in). A save in progress
        writes only keys of a step after the latest, which are left alone."""
        commits = self.commits()
        if not commits:
            return []
        named = {k for c in commits for k in (c.metadata, *(r.archive for r in c.ranks.values()))}
        named |= {self.rank_record_key(c.step, rank, r.digest)
                  for c in commits for rank, r in c.ranks.items()}
        latest = commits[-1].step
        keys = self.store.list(f"{self._prefix}/ranks/") + self.store.list(f"{self._prefix}/steps/")
        return [k for k in keys if k not in named and (_step(k) is not None and _step(k) <= latest)]

    def steps(self) -> list[int]:
        """The committed steps, in order (from the keys alone)."""
        keys = self.store.list(f"{self._prefix}/commits/")
        return [int(key.rsplit("/", 1)[-1].split(".")[0]) for key in keys if key.endswith(".json")]

    def put_commit(self, commit: ShardedCommit) -> bool:
        """Write the commit record; False if the step already has one."""
        return self.store.put_if_absent(self._commit_key(commit.step), commit.to_json())

    def rank_path(self, commit: ShardedCommit, rank: int) -> list[Commit]:
        """Rank ``rank``'s archives to decode for ``commit``: its keyframe first."""
        label = f"run {self.run!r} step {commit.step} rank {rank}"
        if rank not in commit.ranks:
            raise CorruptData(f"{label}: the step has no archive of that rank")
        steps = len(self.store.list(f"{self._prefix}/commits/"))  # no path is longer than the run
        return path_back(commit.ranks[rank], lambda step: self.commit(step).ranks[rank], steps,
                         f"run {self.run!r} rank {rank}")

    # --- DCP's metadata ------------------------------------------------------------

    @staticmethod
    def dump_metadata(metadata: dcp_metadata.Metadata) -> bytes:
        buffer = io.BytesIO()
        torch.save(metadata, buffer)
        return buffer.getvalue()

    def load_metadata(self, commit: ShardedCommit) -> dcp_metadata.Metadata:
        """DCP's metadata of a step, unpickled with only DCP's metadata classes allowed."""
        label = f"run {self.run!r} step {commit.step}"
        try:
            data = self.store.get(commit.metadata)
        except NotFound:
            raise CorruptData(f"{label}: its metadata {commit.metadata} is missing") from None
        try:
            with torch.serialization.safe_globals(_METADATA_CLASSES):
                metadata = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # noqa: BLE001 (torch.load raises anything on bad bytes)
            raise CorruptData(f"{label}: unreadable metadata ({type(exc).__name__})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CorruptData(f"{label}: the metadata is a {type(metadata).__name__}")
        return metadata
