"""A step of a sharded run read back from a store: served to DCP's load planner, on any
number of ranks, or whole in one process.

DCP's load planner decides which chunks each rank needs (resharding N saved ranks
onto M loading ranks is its job); :class:`ShardedStepReader` serves them: for every
saved rank that holds a requested chunk it decodes that rank's chain up to the step
(its keyframe, then its links, each against the previous reconstruction), copies the
requested slices into the planner's tensors, and drops the decoded shard before the
next one, so a loading rank holds at most one saved rank's shard at a time.

A step with an exact copy (:mod:`excp.sharded.exact`) is served bit for bit: each
saved rank's shard is decoded on the CPU, as its copy was coded against it, corrected,
then moved to the decoding device; ``lossy`` serves the reconstruction instead.

Without a process group (one process), DCP loads everything: :func:`load_state_dict`
returns the whole state dict, as ``excp restore`` writes it. :func:`verify` checks
every step of a sharded run.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from excp.bundle import Bundle
from excp.chain import Head
from excp.codec.pipeline import Reconstruction
from excp.errors import CorruptData, InvalidInput
from excp.format.container import ArchiveReader
from excp.sharded.exact import ShardedCopies, ShardedExactCommit
from excp.sharded.heads import remember
from excp.sharded.records import ShardedCommit, ShardedRun
from excp.store import Store


def this_rank(kwargs: dict[str, Any]) -> int:
    """The rank DCP names in its set-up call, else the process group's (0 alone)."""
    rank = kwargs.get("rank")
    if rank is not None:
        return rank
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def no_checkpoint_id(checkpoint_id: str | os.PathLike | None, cls: str) -> None:
    if checkpoint_id is not None:
        raise InvalidInput(f"{cls} takes the run and step as arguments; drop checkpoint_id={checkpoint_id!r}")


class ShardedStepReader(StorageReader):
    """Load step ``step`` (or ``latest``) of sharded run ``run`` from ``store``.

    ``device``: where saved shards are decoded (``cuda`` on a GPU node) before the
    requested slices are copied into the state dict's tensors. ``lossy``: serve the
    reconstruction even where the step has an exact copy.
    """

    def __init__(self, store: Store, run: str, step: int | str = "latest", *, device: str = "cpu",
                 lossy: bool = False) -> None:
        super().__init__()
        self.sharded = ShardedRun(store, run)
        self.wanted, self.device, self.lossy = step, torch.device(device), lossy
        self.commit: ShardedCommit | None = None
        self.exact: ShardedExactCommit | None = None
        self.storage_data: dict[Any, Any] = {}
        self.rank = 0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        no_checkpoint_id(checkpoint_id, type(self).__name__)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if not self.sharded.is_sharded():
            raise CorruptData(f"run {self.sharded.run!r} holds ordinary checkpoints: restore it with "
                              "excp.api.restore or `excp restore`")
        self.commit = self.sharded.resolve(self.wanted)
        return self.sharded.load_metadata(self.commit)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data or {}
        self.rank = this_rank(kwargs)
        if self.commit is None:  # DCP may hand over metadata read by another instance
            self.commit = self.sharded.resolve(self.wanted)
        self.exact = None if self.lossy else ShardedCopies(self.sharded).of(self.commit)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_rank: dict[int, list[tuple[Any, str]]] = defaultdict(list)
        for request in plan.items:
            location = self.storage_data.get(request.storage_index)
            if location is None:
                raise CorruptData(f"run {self.sharded.run!r}: the metadata does not place "
                                  f"{request.storage_index.fqn!r}")
            rank, digest, name = location
            expected = self.commit.ranks.get(rank)
            if expected is None or expected.digest != digest:
                raise CorruptData(f"run {self.sharded.run!r} step {self.commit.step}: the metadata names "
                                  f"an archive of rank {rank} that the commit record does not")
            by_rank[rank].append((request, name))
        for rank in sorted(by_rank):
            shard = self._decode(rank)
            for request, name in by_rank[rank]:
                _serve(request, name, shard, planner, f"run {self.sharded.run!r} rank {rank}")
            del shard
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _decode(self, rank: int) -> Bundle:
        """Saved rank ``rank``'s shard at the step, decoded from its keyframe (and made
        exact by its copy, if served exactly). The rank's own reconstruction is kept as
        the parent of its next save, which is coded against the link either way."""
        device = self.device if self.exact is None else torch.device("cpu")
        bundle, recon = decoded(self.sharded, self.commit, rank, device)
        if rank == self.rank and torch.distributed.is_initialized():
            remember(self.sharded.store, self.sharded.run, rank, Head(self.commit.ranks[rank], recon), bundle)
        if self.exact is None:
            return bundle
        bundle = ShardedCopies(self.sharded).apply(self.exact, rank, bundle)
        for entry in bundle.tensors.values():
            entry.tensor = entry.tensor.to(self.device)
        return bundle


def decoded(sharded: ShardedRun, commit: ShardedCommit, rank: int,
            device: torch.device) -> tuple[Bundle, Reconstruction]:
    """Rank ``rank``'s chain decoded up to ``commit``: its keyframe, then each link."""
    path = sharded.rank_path(commit, rank)
    recon = None
    for i, entry in enumerate(path):
        bundle, recon = sharded.chain.read(entry, recon, device, weights_only=i < len(path) - 1)
    return bundle, recon


def _serve(request: Any, name: str, shard: Bundle, planner: LoadPlanner, label: str) -> None:
    if request.type == LoadItemType.BYTE_IO:
        data = shard.extras.get(name)
        if data is None:
            raise CorruptData(f"{label}: object {name!r} is missing from its archive")
        planner.load_bytes(request, io.BytesIO(data))
        return
    entry = shard.tensors.get(name)
    if entry is None:
        raise CorruptData(f"{label}: tensor {name!r} is missing from its archive")
    piece = entry.tensor
    for dim, (offset, length) in enumerate(zip(request.storage_offsets, request.lengths, strict=True)):
        piece = piece.narrow(dim, offset, length)
    target = planner.resolve_tensor(request).detach()
    if target.shape != piece.shape:
        raise CorruptData(f"{label}: {name!r} gives a {tuple(piece.shape)} slice where "
                          f"{tuple(target.shape)} is wanted")
    target.copy_(piece)
    planner.commit_tensor(request, target)


def verify(store: Store, run: str, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Check every step of a sharded run: its metadata loads, every rank's archive
    passes its checksums and decodes against its parent, and every exact archive passes
    its checksums. Each rank's chain is decoded once, in step order. Returns (steps,
    bytes checked)."""
    sharded = ShardedRun(store, run)
    last: dict[int, tuple[int, Reconstruction]] = {}
    steps = checked = 0
    for commit in sharded.commits():
        sharded.load_metadata(commit)
        for rank, entry in sorted(commit.ranks.items()):
            label = f"run {run!r} step {commit.step} rank {rank}"
            with store.open_read(entry.archive) as handle:
                ArchiveReader(handle, entry.size, label).verify()
            if entry.parent is None:
                parent = None
            elif rank in last and last[rank][0] == entry.parent:
                parent = last[rank][1]
            else:
                parent = decoded(sharded, sharded.commit(entry.parent), rank, torch.device("cpu"))[1]
            last[rank] = (commit.step, sharded.chain.read(entry, parent, "cpu", weights_only=True)[1])
        steps += 1
        checked += commit.size
        if progress:
            progress(1)
    copies = ShardedCopies(sharded)
    checked += sum(copies.verify(record) for record in copies.records())
    return steps, checked


def load_state_dict(store: Store, run: str, step: int | str = "latest", device: str = "cpu",
                    lossy: bool = False) -> dict:
    """The whole state dict of a sharded step in this process, as it was passed to
    ``dcp.save`` (DTensors come back as full tensors): bit for bit where the step has
    an exact copy, unless ``lossy``."""
    state: dict = {}
    # What torch's own dcp_to_torch_save does: the empty planner fills ``state`` from the
    # metadata (the public dcp.load fills a copy of the dict it is given).
    _load_state_dict(state, storage_reader=ShardedStepReader(store, run, step, device=device, lossy=lossy),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
