"""``ExcpStorageWriter``: DCP saves each rank's shard as a compressed excp archive.

DCP's call sequence (``torch.distributed.checkpoint.storage.StorageWriter``) and what
this writer does at each call:

1. all ranks ``set_up_storage_writer``: nothing to do;
2. all ranks ``prepare_local_plan``: nothing to change;
3. the coordinator ``prepare_global_plan``: create the run (or check it is a sharded
   run and the step is new — a refusal here fails every rank before any data moves)
   and tell each rank its number and how many exact copies the run keeps;
4. all ranks ``write_data``: code the rank's items against the rank's previous
   reconstruction (kept in this process's memory) and store the archive and its
   record; every rank does this at once, on its own device;
5. the coordinator ``finish``: store DCP's metadata, then the step's commit record,
   with ``put_if_absent``. Only now does the step exist; a rank that died in 4 means
   DCP never calls 5, and the previous step stays the latest.

A run created with ``keep_exact=K`` also keeps exact copies of its newest K steps: in 4
each rank codes its shard exactly against its own link restored on the CPU and stores
that archive too; in 5, after the commit record, the coordinator writes the step's one
exact record naming every rank's copy, then drops the copies of older steps
(:mod:`excp.sharded.exact`).

The reconstruction a rank keeps is used for its next save only if the step it
belongs to was committed and the rank's tensors are laid out the same (same world
size and sharding); otherwise the rank codes a keyframe and logs why. Memory: one
reconstruction (the rank's weights) per rank, plus what DCP stages (``async_save``
stages one copy of the state dict on the host).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from excp.api import check_keep_exact, check_options
from excp.bundle import Bundle
from excp.chain import Commit, Head, encode_archive, validate_step
from excp.codec.params import CodecParams, params_of
from excp.dcp import items
from excp.errors import Conflict, CorruptData, InvalidInput, NotFound
from excp.exact import encode_copy, on_cpu, validate_keep
from excp.sharded.exact import RankCopy, ShardedCopies, ShardedExactCommit
from excp.sharded.heads import layout_of, recall, remember
from excp.sharded.reader import no_checkpoint_id
from excp.sharded.records import ShardedCommit, ShardedRun
from excp.store import Store, open_store
from excp.target import StoreTarget, Target, is_service_url, service_url

log = logging.getLogger("excp.dcp")

RECORD_READERS = 32


def store_of(target: str | Store | Target | None) -> Store:
    """The store a sharded save goes to, or a sharded load comes from (each rank reaches
    it directly): a store URL (``None``: ``$EXCP_STORE`` or ``./excp-store``), a Store,
    or a store Target; never an excp service."""
    if isinstance(target, StoreTarget):
        return target.store
    if isinstance(target, Store):
        return target
    if isinstance(target, Target) or (isinstance(target, str) and is_service_url(target)):
        url = target.url if isinstance(target, Target) else service_url(target)
        raise InvalidInput(f"{url}: sharded saves write to a store directly (a directory or "
                           "s3://BUCKET/PREFIX that every rank reaches), not through an excp service")
    return open_store(target)


class ExcpStorageWriter(StorageWriter):
    """Save step ``step`` of sharded run ``run`` to ``target`` (a store URL or Store),
    every rank compressing its own shard::

        dcp.save(state_dict, storage_writer=ExcpStorageWriter("s3://ckpts/team", "llm-7b", step))

    ``preset`` sets the codec options of a new run (a name or :class:`CodecParams`);
    an existing run keeps its own. ``keep_exact``: for a new run, how many of the newest
    steps also keep an exact copy of every rank's shard (default 0); an existing run
    keeps its own, and a different number is refused.
    """

    def __init__(self, target: str | Store | Target | None, run: str, step: int, *,
                 preset: str | CodecParams | None = None, keep_exact: int | None = None) -> None:
        super().__init__()
        self.sharded = ShardedRun(store_of(target), run)
        self.step = validate_step(step)
        self.params = params_of(preset)
        self.keep_exact = None if keep_exact is None else validate_keep(keep_exact)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        no_checkpoint_id(checkpoint_id, "ExcpStorageWriter")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{self.sharded.store.url}#{self.sharded.run}/{self.step}")

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up: each rank learns its number from the global plan."""

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.sharded.ensure(self.params or CodecParams(), self.keep_exact or 0)
        check_options(self.sharded.run, self.sharded.chain.params(), None, self.params, None)
        keep = self.sharded.chain.keep_exact()
        check_keep_exact(self.sharded.run, keep, self.keep_exact)
        if self.sharded.has(self.step):
            raise Conflict(f"run {self.sharded.run!r} already has step {self.step}: save under a new step")
        return [dataclasses.replace(plan, storage_data=(rank, keep)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank, keep = plan.storage_data
        results: list[WriteResult] = []
        if plan.items:
            bundle, stored = items.to_bundle(plan.items, planner, self.step)
            digest, copy = self._write_rank(rank, bundle, keep)
            results = [WriteResult(index=item.index, size_in_bytes=_size(item), storage_data=(
                rank, digest, stored[item.index], copy)) for item in plan.items]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_rank(self, rank: int, bundle: Bundle, keep: int) -> tuple[str, RankCopy | None]:
        """Code and store this rank's archive and record, and its exact copy if the run
        keeps ``keep`` > 0 of them; returns the archive's digest and the copy."""
        run, store = self.sharded.run, self.sharded.store
        params = self.sharded.chain.params()
        head = self._parent(rank, bundle)
        with tempfile.TemporaryFile() as spool:
            summary, recon = encode_archive(run, params, head.commit if head else None, bundle, self.step,
                                            spool, lambda _: head.recon)
            key = self.sharded.archive_key(self.step, rank, summary.digest)
            spool.seek(0)
            store.put(key, spool)
        commit = Commit.of_archive(summary.header, key, summary.digest, summary.size,
                                   head.commit if head else None)
        store.put(self.sharded.rank_record_key(self.step, rank, summary.digest), commit.to_json())
        copy = None
        if keep and params.mode != "lossless":
            copy = self._write_copy(rank, bundle, commit, head, params.zstd_level)
        remember(store, run, rank, Head(commit, recon), bundle)
        return summary.digest, copy

    def _write_copy(self, rank: int, bundle: Bundle, link: Commit, head: Head | None, level: int) -> RankCopy:
        """Store this rank's exact copy, coded against ``link`` restored on the CPU (as an
        exact load decodes it, whatever device saved it); it exists once ``finish``
        writes the step's exact record."""
        lossy, _ = self.sharded.chain.read(link, on_cpu(head.recon) if head else None, "cpu",
                                           weights_only=False)
        with tempfile.TemporaryFile() as spool:
            summary = encode_copy(self.sharded.run, bundle, lossy, link, level, spool)
            key = ShardedCopies(self.sharded).archive_key(self.step, rank, summary.digest)
            spool.seek(0)
            self.sharded.store.put(key, spool)
        return RankCopy(key, summary.digest, summary.size, link.digest, summary.header["content"])

    def _parent(self, rank: int, bundle: Bundle) -> Head | None:
        """The reconstruction this rank codes against, or None for a keyframe."""
        head, layout = recall(self.sharded.store, self.sharded.run, rank)
        label = f"excp: run {self.sharded.run} rank {rank} step {self.step}"
        if head is None:
            log.info("%s: keyframe, because this process holds no earlier step of this rank (a new "
                     "job, or one that loaded on another topology)", label)
            return None
        try:
            committed = self.sharded.commit(head.commit.step).ranks.get(rank)
        except NotFound:
            committed = None
        if committed is None or committed.digest != head.commit.digest:
            log.warning("%s: keyframe, because this rank's last save (step %d) was never committed",
                        label, head.commit.step)
            return None
        if layout_of(bundle) != layout:
            log.warning("%s: keyframe, because the sharding changed since step %d (world size or "
                        "parallelism)", label, head.commit.step)
            return None
        device = next((e.tensor.device for e in bundle.tensors.values()), None)
        if device is not None and any(t.device != device for t in head.recon.values()):
            head = Head(head.commit, {name: t.to(device) for name, t in head.recon.items()})
        return head

    def _rank_record(self, written: tuple[int, str]) -> Commit:
        rank, digest = written
        key = self.sharded.rank_record_key(self.step, rank, digest)
        try:
            return Commit.from_json(self.sharded.store.get(key), key)
        except NotFound:
            raise CorruptData(f"run {self.sharded.run!r} step {self.step}: rank {rank}'s record "
                              "vanished before the commit; save the step again") from None

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        store = self.sharded.store
        # what a load needs: (rank, link digest, name); the rank's exact copy goes in its own record
        metadata.storage_data = {r.index: r.storage_data[:3] for rank_results in results
                                 for r in rank_results}
        data = ShardedRun.dump_metadata(metadata)
        key = self.sharded.metadata_key(self.step, hashlib.blake2b(data, digest_size=16).hexdigest())
        store.put(key, data)
        written = sorted({r.storage_data[:2] for rank_results in results for r in rank_results})
        with ThreadPoolExecutor(RECORD_READERS) as pool:  # 1,024 ranks: 1,024 small GETs
            ranks = {rank: record for (rank, _), record in zip(written, pool.map(self._rank_record, written),
                                                               strict=True)}
        commit = ShardedCommit(step=self.step, world_size=len(results), ranks=ranks, metadata=key,
                               metadata_size=len(data))
        if not self.sharded.put_commit(commit):
            raise Conflict(f"run {self.sharded.run!r}: another save committed step {self.step} first")
        log.info("excp: run %s step %d committed: %d ranks, %.1fx", self.sharded.run, self.step,
                 len(ranks), commit.ratio)
        copies = {r.storage_data[0]: r.storage_data[3] for rank_results in results for r in rank_results}
        if copies and all(copies.values()):
            self._commit_copies(commit, copies)

    def _commit_copies(self, commit: ShardedCommit, copies: dict[int, RankCopy]) -> None:
        """Write the step's exact record, naming every rank's copy (after the commit
        record: a copy exists only of a committed step, and for all its ranks), then
        drop the copies of steps beyond the newest ``keep_exact``."""
        exact = ShardedCopies(self.sharded)
        if exact.put(ShardedExactCommit(step=commit.step, ranks=copies)):
            log.info("excp: run %s step %d: exact copy of %d ranks kept", self.sharded.run, self.step,
                     len(copies))
        exact.retain(self.sharded.chain.keep_exact(), self.sharded.steps())


def _size(item: Any) -> int:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    dtype = item.tensor_data.properties.dtype
    return int(torch.Size(item.tensor_data.chunk.sizes).numel()) * dtype.itemsize
