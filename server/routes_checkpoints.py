"""/v1/runs/{run}/checkpoints: upload (archive, exact copy or raw), list, metadata, restore, delete."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from excp import api
from excp.chain import Chain, Commit, PushResult
from excp.errors import CorruptData, InvalidInput, NotFound
from excp.exact import ExactCommit, ExactCopies
from excp.format.container import ArchiveReader
from excp.place import Place
from server import jobs
from server.auth import Principal, Scope
from server.context import (
    Caller,
    Here,
    RunPath,
    Services,
    StepOrLatestPath,
    StepPath,
    Svc,
    run_name,
    spool_body,
    step_number,
    step_or_latest,
)
from server.restore_cache import RestoreCache
from server.schemas import ERRORS, CheckpointList, CheckpointMeta, CommitResult, ExactMeta, ExactResult

router = APIRouter(prefix="/v1/runs/{run}/checkpoints", tags=["checkpoints"], responses=ERRORS)

_CHUNK = 1 << 20
_SAFETENSORS_TYPES = {"application/safetensors", "application/x-safetensors", "application/vnd.safetensors"}
_SUFFIX = {"torch": "pt", "safetensors": "safetensors", "tar": "tar"}
_MEDIA = {"torch": "application/octet-stream", "safetensors": "application/octet-stream",
          "tar": "application/x-tar"}
_OCTETS = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                "format": "binary"}}}}}
_NOOP: dict[int | str, dict[str, Any]] = {
    200: {"model": CommitResult, "description": "This exact checkpoint was already stored"}}
Limit = Annotated[int, Query(ge=1, le=1000)]


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    """A file's bytes, a megabyte at a time (Starlette iterates this on a thread)."""
    with handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def _stream(handle: BinaryIO, size: int, media: str, filename: str,
            headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(_chunks(handle), media_type=media, headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"', **headers})


def _readable(run: str, who: Principal, svc: Services, here: Place) -> Chain:
    name = run_name(run)
    who.require(Scope.READ, name)
    return Chain(svc.store, name, here)


async def _writable(run: str, who: Principal, svc: Services, here: Place, scope: Scope = Scope.WRITE
                    ) -> Chain:
    """The run's chain, after checking access and that the run exists (before any body
    is read, so a mistake costs no upload)."""
    name = run_name(run)
    who.require(scope, name)
    chain = Chain(svc.store, name, here)
    await run_in_threadpool(chain.config)
    return chain


def _result(run: str, commit: Commit, created: bool, response: Response, svc: Services,
            source: str) -> CommitResult:
    response.status_code = 201 if created else 200
    if created:
        svc.metrics.ratio.labels(source).observe(commit.ratio)
    return CommitResult(created=created, **CheckpointMeta.of(run, commit).model_dump())


@router.get("", response_model=CheckpointList, summary="List checkpoints in step order")
async def list_checkpoints(run: RunPath, who: Caller, svc: Svc, here: Here, limit: Limit = 100,
                           after: Annotated[int | None, Query(ge=0)] = None) -> CheckpointList:
    """``limit`` checkpoints with steps after ``after``."""
    chain = _readable(run, who, svc, here)

    def page() -> CheckpointList:
        chain.config()
        later = [c for c in chain.commits() if after is None or c.step > after]
        shown = later[:limit]
        return CheckpointList(checkpoints=[CheckpointMeta.of(chain.run, c) for c in shown],
                              next=shown[-1].step if len(later) > limit else None)

    return await run_in_threadpool(page)


@router.get("/{step}/meta", response_model=CheckpointMeta,
            summary="A checkpoint's commit record: parent, keyframe, sizes, ratio, checksums")
async def checkpoint_meta(run: RunPath, step: StepOrLatestPath, who: Caller, svc: Svc,
                          here: Here) -> CheckpointMeta:
    """``step`` is a number or ``latest``."""
    chain = _readable(run, who, svc, here)
    wanted = step_or_latest(step)
    commit = await run_in_threadpool(lambda: chain.commit(chain.resolve(wanted)))
    return CheckpointMeta.of(chain.run, commit)


def _commit_upload(chain: Chain, upload: BinaryIO, step: int) -> PushResult:
    upload.seek(0, 2)
    size = upload.tell()
    header = ArchiveReader(upload, size, f"the upload for run {chain.run!r} step {step}").header
    if header.get("step") != step:
        raise InvalidInput(f"the archive is coded as step {header.get('step')!r}, not {step}: "
                           "upload it under its own step")
    return chain.commit_archive(upload)


@router.put("/{step}/archive", status_code=201, response_model=CommitResult, openapi_extra=_OCTETS,
            summary="Upload and commit an archive coded on a training node", responses=_NOOP)
async def upload_archive(run: RunPath, step: StepPath, request: Request, response: Response, who: Caller,
                         svc: Svc, here: Here) -> CommitResult:
    """The body is an archive made by ``excp.chain.encode_archive`` against the run's head
    (its record is in GET /v1/runs/{run}). Upload, validation and commit are one
    request: the body is streamed to a temporary file, every checksum is verified, the
    archive is stored, and its commit record is written last. 201: committed; 200: the
    same checkpoint was already there; 409: another checkpoint holds the step, or the
    head moved (code against the new head); 422: the archive fails its checks. A
    request that dies half-way commits nothing."""
    number = step_number(step)
    chain = await _writable(run, who, svc, here)
    with tempfile.TemporaryFile(dir=svc.spool) as upload:
        await spool_body(request, upload)
        async with svc.locks(chain.run):
            result = await run_in_threadpool(_commit_upload, chain, upload, number)
    return _result(chain.run, result.commit, result.created, response, svc, "archive")


def _commit_exact(chain: Chain, upload: BinaryIO, step: int) -> tuple[ExactCommit, bool]:
    """Commit an uploaded exact copy of ``step``'s link, then drop the copies beyond the
    run's newest ``keep_exact`` steps."""
    keep = chain.keep_exact()
    if keep == 0 or chain.params().mode == "lossless":
        raise InvalidInput(f"run {chain.run!r} keeps no exact copies (keep_exact 0, or every step is "
                           "lossless): create the run with keep_exact K to keep them")
    copies = ExactCopies(chain.store, chain.run)
    record, created = copies.commit_archive(upload, chain.commit(step))
    copies.retain(keep, [c.step for c in chain.commits()])
    return record, created


@router.put("/{step}/exact", status_code=201, response_model=ExactResult, openapi_extra=_OCTETS,
            summary="Upload and commit the exact copy of a committed step",
            responses={200: {"model": ExactResult, "description": "The step already had its exact copy"}})
async def upload_exact(run: RunPath, step: StepPath, request: Request, response: Response, who: Caller,
                       svc: Svc, here: Here) -> ExactResult:
    """The body is an exact copy made by ``excp.exact.encode_copy`` against the step's
    link, restored on the CPU (its digest is the step's ``digest``). Every checksum is
    verified and the header must name that link; the archive is stored and its record
    written last, then copies beyond the run's newest ``keep_exact`` steps are deleted.
    201: committed; 200: the step already had one; 400: the run keeps no exact copies;
    404: no such step; 409: the copy corrects another link; 422: it fails its checks."""
    number = step_number(step)
    chain = await _writable(run, who, svc, here)
    with tempfile.TemporaryFile(dir=svc.spool) as upload:
        await spool_body(request, upload)
        async with svc.locks(chain.run):
            record, created = await run_in_threadpool(_commit_exact, chain, upload, number)
    response.status_code = 201 if created else 200
    return ExactResult(created=created, **ExactMeta.of(record).model_dump())


@router.get("/{step}/exact", summary="Download a step's exact copy", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The archive"}})
async def download_exact(run: RunPath, step: StepOrLatestPath, who: Caller, svc: Svc,
                         here: Here) -> StreamingResponse:
    """The exact copy's archive as stored (``latest`` works); 404 if the step has none.
    Its record is in GET /v1/runs/{run} (``exact``); its blake2b-128 is ``X-Excp-Digest``."""
    chain = _readable(run, who, svc, here)
    wanted = step_or_latest(step)

    def find() -> ExactCommit:
        commit = chain.commit(chain.resolve(wanted))
        record = ExactCopies(chain.store, chain.run).of(commit)
        if record is None:
            raise NotFound(f"run {chain.run!r} step {commit.step} has no exact copy: restore it with "
                           "lossy=true")
        return record

    record = await run_in_threadpool(find)
    return await _stored_archive(svc, record.archive, record.size, record.digest, record.step,
                                 f"{chain.run}-{record.step}-exact.excp",
                                 f"run {chain.run!r} step {record.step}: exact archive {record.archive} "
                                 "is missing; restore it with lossy=true")


async def _stored_archive(svc: Services, key: str, size: int, digest: str, step: int, filename: str,
                          missing: str) -> StreamingResponse:
    """An archive streamed as stored, with its step and digest in the headers; ``missing``
    is the error when its record names a key the store has lost."""
    try:
        handle = await run_in_threadpool(svc.store.open_read, key)
    except NotFound:
        raise CorruptData(missing) from None
    return _stream(handle, size, "application/octet-stream", filename,
                   {"X-Excp-Step": str(step), "X-Excp-Digest": digest})


def _upload_kind(kind: str | None, content_type: str | None) -> str:
    if kind is not None:
        if kind not in ("torch", "safetensors"):
            raise InvalidInput(f"unknown kind {kind!r}: use kind=torch or kind=safetensors")
        return kind
    mime = (content_type or "").split(";")[0].strip().lower()
    return "safetensors" if mime in _SAFETENSORS_TYPES else "torch"


@router.post("/{step}/raw", status_code=201, response_model=CommitResult, openapi_extra=_OCTETS,
             summary="Upload a raw checkpoint for the server to compress", responses=_NOOP)
async def upload_raw(run: RunPath, step: StepPath, request: Request, response: Response, who: Caller,
                     svc: Svc, here: Here, kind: Annotated[str | None, Query(
                         description="torch (default) or safetensors",
                         json_schema_extra={"enum": ["torch", "safetensors"]})] = None,
                     content_type: Annotated[str | None, Header()] = None) -> CommitResult:
    """The body is a ``torch.save`` file (a ``{model, optimizer, ...}`` dict or a state
    dict) or a ``.safetensors`` state dict: ``?kind=`` says which, else a
    ``Content-Type`` of ``application/x-safetensors`` means safetensors. It is compressed
    against the head by a worker process and committed, with its exact copy if the run
    keeps them, as ``excp push`` would."""
    number = step_number(step)
    chosen = _upload_kind(kind, content_type)
    chain = await _writable(run, who, svc, here)
    with tempfile.TemporaryDirectory(dir=svc.spool) as tmp:
        path = Path(tmp) / f"upload.{_SUFFIX[chosen]}"
        with open(path, "wb") as out:
            await spool_body(request, out)
        async with svc.locks(chain.run):
            record, created = await svc.workers.run(jobs.compress, chain.run, number, str(path),
                                                    svc.config.allowed_factories)
    return _result(chain.run, Commit(**record), created, response, svc, "raw")


@dataclass(frozen=True)
class _Plan:
    step: int
    layout: str
    key: str


def _plan(svc: Services, chain: Chain, step: int | str, fmt: str, lossy: bool) -> _Plan:
    """Resolve the step, check the format fits its layout, and name its cache entry after
    every archive the restore decodes, the exact copy included (read from the store
    now, every time)."""
    number = chain.resolve(step)
    path = chain.path_to(number)
    target = path[-1]
    label = f"run {chain.run!r} step {number}"
    try:
        with svc.store.open_read(target.archive) as handle:
            layout = str(ArchiveReader(handle, target.size, label).header.get("layout"))
    except NotFound:
        raise CorruptData(f"{label}: archive {target.archive} is missing; restore another step") from None
    jobs.check_format(layout, fmt)
    digests = [c.digest for c in path]
    exact = None if lossy else ExactCopies(chain.store, chain.run).of(target)
    if exact is not None:
        digests.append(exact.digest)
    elif lossy:
        api.check_lossy(chain.run, chain.params())
    key = RestoreCache.key(svc.store.url, chain.run, fmt, digests, chain.config().get("base"))
    return _Plan(number, layout, key)


@router.get("/{step}", summary="Restore a checkpoint", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}},
                             "description": "The reconstructed checkpoint"}})
async def restore(run: RunPath, step: StepOrLatestPath, who: Caller, svc: Svc, here: Here,
                  fmt: Annotated[str, Query(alias="format", description="torch, safetensors, tar",
                                            json_schema_extra={"enum": list(_SUFFIX)})] = "torch",
                  lossy: Annotated[bool, Query(description="The link's reconstruction even where the "
                                                           "step has an exact copy")] = False,
                  ) -> StreamingResponse:
    """Reconstruct ``step`` (a number or ``latest``) in a worker process and stream it:
    ``torch`` is the checkpoint as pushed, ``torch.load(weights_only=True)``-able;
    ``safetensors`` every tensor under its bundle entry name; ``tar`` a Trainer
    directory. A step with an exact copy comes back bit for bit unless ``lossy=true``
    (400 for a lossless-mode run, which has no other reconstruction). Reconstructions
    are cached on disk (bounded), keyed by the archive digests the store names now."""
    chain = _readable(run, who, svc, here)
    wanted = step_or_latest(step)
    started = time.perf_counter()
    plan = await run_in_threadpool(_plan, svc, chain, wanted, fmt, lossy)
    handle = await run_in_threadpool(svc.cache.open, plan.key)
    hit = handle is not None
    if handle is None:
        staged = svc.cache.staging()
        try:
            await svc.workers.run(jobs.restore_to, chain.run, plan.step, fmt, str(staged),
                                  svc.config.allowed_factories, lossy)
            handle = await run_in_threadpool(svc.cache.commit, plan.key, staged)
        finally:
            await run_in_threadpool(svc.cache.discard, staged)
    svc.metrics.restore.labels(fmt, "hit" if hit else "miss").observe(time.perf_counter() - started)
    size = os.fstat(handle.fileno()).st_size
    return _stream(handle, size, _MEDIA[fmt], f"{chain.run}-{plan.step}.{_SUFFIX[fmt]}",
                   {"X-Excp-Step": str(plan.step), "X-Excp-Layout": plan.layout})


@router.get("/{step}/archive", summary="Download the stored archive", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The archive"}})
async def download_archive(run: RunPath, step: StepOrLatestPath, who: Caller, svc: Svc,
                           here: Here) -> StreamingResponse:
    """The archive bytes exactly as stored (``latest`` works); its blake2b-128 is
    ``X-Excp-Digest``."""
    chain = _readable(run, who, svc, here)
    wanted = step_or_latest(step)
    commit = await run_in_threadpool(lambda: chain.commit(chain.resolve(wanted)))
    return await _stored_archive(svc, commit.archive, commit.size, commit.digest, commit.step,
                                 f"{chain.run}-{commit.step}.excp",
                                 f"run {chain.run!r} step {commit.step}: archive {commit.archive} "
                                 "is missing; restore another step")


@router.delete("/{step}", status_code=204, summary="Delete a checkpoint no other depends on (admin)")
async def delete_checkpoint(run: RunPath, step: StepPath, who: Caller, svc: Svc, here: Here) -> Response:
    """Only a checkpoint that no other checkpoint's restore goes through may be deleted:
    the head, or a step whose next checkpoint is a keyframe. Anything else is a 409
    naming the steps that need it (delete those first, newest first). Nothing is ever
    re-based, so a delete never rewrites or re-encodes another checkpoint."""
    number = step_number(step)
    chain = await _writable(run, who, svc, here, Scope.ADMIN)
    async with svc.locks(chain.run):
        await run_in_threadpool(chain.delete, number)
        await run_in_threadpool(ExactCopies(chain.store, chain.run).drop, number)
    return Response(status_code=204)
