"""/v1/runs: create (with codec options), list, describe, delete."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from excp import api
from excp.chain import Chain
from excp.codec.params import CodecParams, preset
from excp.errors import Conflict, InvalidInput
from excp.exact import ExactCopies, validate_keep
from server import jobs
from server.auth import Scope
from server.context import Caller, Here, RunPath, Svc, run_name
from server.schemas import ERRORS, CheckpointMeta, ExactMeta, RunCreate, RunInfo, RunList

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=ERRORS)


def codec_params(preset_name: str, overrides: dict[str, Any]) -> CodecParams:
    """A preset with single options replaced, each checked for name and type here, so a
    typo is a 400 that lists the options rather than an error deep in the codec."""
    base = preset(preset_name)
    kinds = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(CodecParams)}
    unknown = sorted(set(overrides) - set(kinds))
    if unknown:
        raise InvalidInput(f"unknown codec options {unknown}: use any of {sorted(kinds)}")
    values = {}
    for name, value in overrides.items():
        kind = kinds[name]
        fits = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if isinstance(value, bool) or not fits:
            raise InvalidInput(f"codec option {name!r} must be of type {kind.__name__}, got {value!r}")
        values[name] = kind(value)
    return base.replace(**values)


def run_info(chain: Chain) -> RunInfo:
    """A run's options and chain statistics (reads every commit record)."""
    config = chain.config()
    commits = chain.commits()
    stored = sum(c.size for c in commits)
    raw = sum(c.raw_bytes for c in commits)
    links = {c.step: c.digest for c in commits}
    exact = [ExactMeta.of(r) for r in ExactCopies(chain.store, chain.run).records()
             if links.get(r.step) == r.link]
    return RunInfo(name=chain.run, params=config["params"], base=config.get("base"),
                   keep_exact=int(config.get("keep_exact", 0)), exact=exact,
                   created_at=config.get("created_at"),
                   head=CheckpointMeta.of(chain.run, commits[-1]) if commits else None,
                   checkpoints=len(commits), keyframes=sum(c.keyframe for c in commits),
                   stored_bytes=stored, raw_bytes=raw, ratio=round(raw / stored, 4) if stored else None)


def _check_same_options(name: str, config: dict[str, Any], params: CodecParams, body: RunCreate) -> None:
    """An existing run created again: the same options, or a Conflict naming the fix."""
    base = config.get("base")
    wanted = None if body.base is None else (body.base.seed, body.base.factory)
    if config.get("params") != params.to_dict() or wanted != (base and (base["seed"], base["factory"])):
        raise Conflict(f"run {name!r} already exists with other options: "
                       "pick another name, or create it with the same options")
    stored = int(config.get("keep_exact", 0))
    if body.keep_exact != stored:
        raise Conflict(f"run {name!r} already exists keeping exact copies of the newest {stored} steps, "
                       f"not {body.keep_exact}: pass keep_exact {stored}, or pick another name")


@router.post("", status_code=201, response_model=RunInfo, summary="Create a run",
             responses={200: {"model": RunInfo, "description": "The run exists with the same options"}})
async def create_run(body: RunCreate, response: Response, who: Caller, svc: Svc, here: Here) -> RunInfo:
    """Create a run with a preset and single codec options over it, and how many of its
    newest steps keep an exact copy (``keep_exact``). Creating an existing run with the
    same options is a no-op (200); with other options, 409. A run started from a seed
    names a model factory the server was started with (``--allow-factory``)."""
    name = run_name(body.name)
    who.require(Scope.WRITE, name)
    params = codec_params(body.preset, body.params)
    keep = validate_keep(body.keep_exact)
    if body.base is not None and body.base.factory not in svc.config.allowed_factories:
        raise InvalidInput(f"model factory {body.base.factory!r} is not allowed on this server: "
                           f"start it with --allow-factory {body.base.factory}")
    chain = Chain(svc.store, name, here)
    async with svc.locks(name):
        if await run_in_threadpool(chain.exists):
            _check_same_options(name, await run_in_threadpool(chain.config), params, body)
            response.status_code = 200
        elif body.base is not None:
            await svc.workers.run(jobs.create_run, name, params.to_dict(), body.base.seed, body.base.factory,
                                  keep)
        else:
            await run_in_threadpool(jobs.create_run, svc.store, name, params.to_dict(), None, None, keep)
    return await run_in_threadpool(run_info, chain)


@router.get("", response_model=RunList, summary="List the runs this token may read")
async def list_runs(who: Caller, svc: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    after: str | None = None) -> RunList:
    """Run names in sorted order, only those the token may read, ``limit`` at a time
    after the name ``after``."""
    names = await run_in_threadpool(api.list_runs, svc.store)
    readable = [n for n in names if who.may_read(n) and (after is None or n > after)]
    page = readable[:limit]
    return RunList(runs=page, next=page[-1] if len(readable) > limit else None)


@router.get("/{run}", response_model=RunInfo, summary="Describe a run: options, head, chain stats")
async def get_run(run: RunPath, who: Caller, svc: Svc, here: Here) -> RunInfo:
    name = run_name(run)
    who.require(Scope.READ, name)
    return await run_in_threadpool(run_info, Chain(svc.store, name, here))


@router.delete("/{run}", status_code=204, summary="Delete a run and every checkpoint (admin)")
async def delete_run(run: RunPath, who: Caller, svc: Svc, here: Here) -> Response:
    """Commit records go newest first, so an interrupted delete leaves a shorter chain that
    still restores; then the archives, then the run itself."""
    name = run_name(run)
    who.require(Scope.ADMIN, name)
    async with svc.locks(name):
        await run_in_threadpool(Chain(svc.store, name, here).delete_run)
    return Response(status_code=204)
