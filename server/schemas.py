"""The JSON bodies of the API, as pydantic models so that /docs shows them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from excp.chain import RUN_NAME, RUN_NAME_RULE, Commit
from excp.codec.params import PRESETS
from excp.exact import ExactCommit


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. not_found, conflict, too_large")
    message: str = Field(description="What is wrong and what to do, in one line")


class ErrorBody(BaseModel):
    error: ErrorDetail


class BaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(ge=0)
    factory: str = Field(description="pkg.module:fn, one of the server's --allow-factory")


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The pattern and the enum document what the route checks (with its own messages).
    name: str = Field(description=RUN_NAME_RULE,
                      json_schema_extra={"pattern": f"^{RUN_NAME.pattern}$"})
    preset: str = Field("default", description=", ".join(PRESETS), json_schema_extra={"enum": list(PRESETS)})
    params: dict[str, float | int | str] = Field(
        default_factory=dict, description='Single codec options over the preset, e.g. {"keyframe_every": 10}')
    base: BaseIn | None = Field(None, description="Start from weights rebuilt from a seed")
    keep_exact: int = Field(0, strict=True,
                            description="Also keep an exact copy of the newest K steps (0: none)")


class CheckpointMeta(BaseModel):
    """A commit record. Its fields other than ``run`` and ``ratio`` are exactly
    :class:`excp.chain.Commit`'s, so a training node can rebuild the head's record from
    it and code the next archive against it."""

    run: str
    step: int
    parent: int | None = Field(description="Step this one is coded against; null for a keyframe")
    keyframe: bool
    depth: int = Field(description="Links since the last keyframe")
    size: int = Field(description="Stored archive bytes")
    raw_bytes: int = Field(description="fp32 weights + moments, what the ratio is measured against")
    ratio: float
    num_parameters: int
    digest: str = Field(description="blake2b-128 of the archive (also in its store key)")
    input_digest: str = Field(description="Content hash of the checkpoint as pushed")
    archive: str = Field(description="Store key of the archive")
    created_at: float
    version: int

    @classmethod
    def of(cls, run: str, commit: Commit) -> CheckpointMeta:
        return cls(run=run, ratio=round(commit.ratio, 4), **asdict(commit))


class CommitResult(CheckpointMeta):
    created: bool = Field(description="False when this exact checkpoint was already stored (200)")


class ExactMeta(BaseModel):
    """An exact copy's record: its fields are exactly :class:`excp.exact.ExactCommit`'s,
    so a training node can mirror the copy and restore the step bit for bit."""

    step: int
    archive: str = Field(description="Store key of the exact copy's archive")
    digest: str = Field(description="blake2b-128 of that archive")
    size: int = Field(description="Stored bytes of that archive")
    link: str = Field(description="Digest of the link archive the copy corrects")
    content: str = Field(description="Content hash of the checkpoint the copy gives back")
    created_at: float
    version: int

    @classmethod
    def of(cls, record: ExactCommit) -> ExactMeta:
        return cls(**asdict(record))


class ExactResult(ExactMeta):
    created: bool = Field(description="False when the step already had its exact copy (200)")


class RunInfo(BaseModel):
    name: str
    params: dict[str, Any]
    base: dict[str, Any] | None
    keep_exact: int = Field(description="How many of the newest steps keep an exact copy")
    exact: list[ExactMeta] = Field(description="The exact copies of committed links, in step order")
    created_at: float | None
    head: CheckpointMeta | None
    checkpoints: int
    keyframes: int
    stored_bytes: int
    raw_bytes: int
    ratio: float | None


class RunList(BaseModel):
    runs: list[str]
    next: str | None = Field(description="Pass as ?after= for the next page; null on the last")


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointMeta]
    next: int | None = Field(description="Pass as ?after= for the next page; null on the last")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "invalid_input: bad run name, step, option or file"),
        (401, "unauthorized: no token, or an unknown one"),
        (403, "forbidden: the token's scopes or prefixes do not cover this run"),
        (404, "not_found: no such run or step"),
        (408, "request_timeout: the body stalled past the server's --client-timeout; send it again"),
        (409, "conflict / chain_mismatch: the step exists with other content, is not after the "
              "head, or others depend on it"),
        (413, "too_large: the body is over the server's limit"),
        (431, "too_large: the URL and headers are over 16 KiB"),
        (422, "corrupt_data / unsupported_version: an archive or record fails its checks"),
        (503, "store_unavailable / worker_failed: retry later"),
    ]
}
