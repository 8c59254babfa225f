"""A training run as a chain of checkpoints in a store.

Store layout (any backend)::

    runs/<run>/run.json                               codec parameters, base, created-at
    runs/<run>/archives/<step:012d>-<digest>.excp     archive, written first
    runs/<run>/commits/<step:012d>.json               commit record, written last
    runs/<run>/exact/...                              exact copies (:mod:`excp.exact`)

A checkpoint exists iff its commit record exists; the record is written with
``put_if_absent``, so of two racing writers exactly one commits a step. Every link
is coded against its parent's *reconstruction*; every ``keyframe_every`` links a
keyframe is coded standalone, so a restore walks at most that many links. The chain's
root is a keyframe, or — for a run created with an init seed — a link against the
weights the model factory rebuilds (checked against a stored hash).

This is the only module that knows about parents and keyframes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, NamedTuple, TypeVar

import torch

from excp.bundle import Bundle, Role, TensorEntry
from excp.codec.params import CodecParams
from excp.codec.pipeline import Reconstruction, check_parent, decode_archive, encode_bundle
from excp.errors import ChainMismatch, Conflict, CorruptData, InvalidInput, NotFound
from excp.format.container import ArchiveReader, ArchiveSummary, ArchiveWriter
from excp.place import Place
from excp.store import Store

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
RECORD_VERSION = 1
MAX_STEP = 10**12 - 1
T = TypeVar("T")


def validate_run(run: str) -> str:
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        raise InvalidInput(
            f"invalid run name {run!r}: use {RUN_NAME_RULE}")
    return run


def validate_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise InvalidInput(f"invalid step {step!r}: use an integer from 0 to {MAX_STEP}")
    return step


def _step_of(key: str) -> int | None:
    """The step in a key named ``.../<step:012d>-<digest>.<suffix>``."""
    head = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def read_record(data: bytes, label: str, build: Callable[[dict[str, Any]], T]) -> T:
    """A JSON commit record of this version, built by ``build``; anything malformed is
    CorruptData naming the record."""
    try:
        fields = json.loads(data)
        if fields.get("version") != RECORD_VERSION:
            raise CorruptData(f"{label}: commit record version {fields.get('version')!r} "
                              f"is not {RECORD_VERSION}: upgrade excp")
        return build(fields)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CorruptData(f"{label}: unreadable commit record ({exc}); run `excp verify`") from None


@dataclass(frozen=True)
class Commit:
    """The record that makes a step exist. ``depth`` counts links since the keyframe
    (0 for a keyframe); ``parent`` is None for a keyframe or a link against the base."""

    step: int
    archive: str
    digest: str
    size: int
    parent: int | None
    keyframe: bool
    depth: int
    num_parameters: int
    raw_bytes: int
    input_digest: str
    created_at: float
    version: int = RECORD_VERSION

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.size, 1)

    @classmethod
    def of_archive(cls, header: dict[str, Any], archive: str, digest: str, size: int,
                   head: Commit | None) -> Commit:
        """The record of an archive stored under ``archive``, coded after ``head``."""
        keyframe = header["keyframe"]
        return cls(step=header["step"], archive=archive, digest=digest, size=size, parent=header["parent"],
                   keyframe=keyframe, depth=0 if keyframe or head is None else head.depth + 1,
                   num_parameters=header["num_parameters"], raw_bytes=header["raw_bytes"],
                   input_digest=header["input_digest"], created_at=time.time())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, label: str) -> Commit:
        return read_record(data, label, lambda fields: cls(**fields))


@dataclass(frozen=True)
class Base:
    """The weights a run starts from when they are rebuilt from a seed rather than stored."""

    seed: int
    factory: str
    digest: str


@dataclass
class PushResult:
    commit: Commit
    created: bool
    stream_bytes: dict[str, int]


class Head(NamedTuple):
    """A committed step and its reconstruction, as a pusher keeps them between pushes
    (the reconstruction is only used while ``commit`` is still the run's head)."""

    commit: Commit
    recon: Reconstruction


def raw_size(bundle: Bundle) -> int:
    """What the ratio is measured against: every weight and moment as float32."""
    return sum(4 * e.tensor.numel() for e in bundle.tensors.values() if e.role is not Role.OTHER)


def archive_digest(handle: BinaryIO) -> str:
    """The blake2b-128 an archive is named by (what ``ArchiveWriter`` computes while
    writing), of a file read from its start."""
    handle.seek(0)
    hasher = hashlib.blake2b(digest_size=16)
    while chunk := handle.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


def recon_digest(recon: Reconstruction) -> str:
    """Content hash of a reconstruction (used to check a rebuilt base)."""
    bundle = Bundle("base")
    for name in sorted(recon):
        bundle.add(TensorEntry(name, Role.WEIGHT, recon[name]))
    return bundle.digest()


def _same_tensors(bundle: Bundle, parent: Reconstruction, label: str) -> bool:
    """Whether every weight has a parent to be coded against.

    A changed shape or dtype is an error (a different model in the same run); a
    weight the parent lacks (e.g. optimizer state appeared after step 0, turning a
    tensor from ``other`` into a weight) only means this link must be a keyframe.
    """
    covered = True
    for entry in bundle.weights():
        prev = parent.get(entry.name)
        covered = covered and prev is not None
        check_parent(entry, prev, label)
    return covered


def encode_archive(run: str, params: CodecParams, head: Commit | None, bundle: Bundle, step: int,
                   out: BinaryIO, parent_recon: Callable[[Commit], Reconstruction],
                   base_recon: Reconstruction | None = None,
                   progress: Callable[[int], None] | None = None,
                   ) -> tuple[ArchiveSummary, Reconstruction]:
    """Code ``bundle`` as the step after ``head`` into ``out``; returns the archive's
    summary and the step's reconstruction. Needs only the head's record and
    reconstruction, not the store, so a training node can code an archive that a
    server then commits (:meth:`Chain.commit_archive`)."""
    label = f"run {run!r} step {step}"
    if head is None:
        keyframe, parent = base_recon is None, base_recon
    else:
        keyframe = params.keyframe_every > 0 and head.depth + 1 >= params.keyframe_every
        parent = None if keyframe else parent_recon(head)
        if parent is not None and not _same_tensors(bundle, parent, label):
            keyframe, parent = True, None
    header = {"layout": bundle.layout, "run": run, "step": step,
              "parent": None if keyframe or head is None else head.step,
              "keyframe": keyframe, "params": params.to_dict(),
              "num_parameters": bundle.num_parameters(), "raw_bytes": raw_size(bundle),
              "input_digest": bundle.digest()}
    writer = ArchiveWriter(out, level=params.zstd_level, symbols=params.mode == "excp")
    recon = encode_bundle(bundle, writer, params, parent, keyframe, label, progress)
    return writer.finish(header), recon


def path_back(last: Commit, parent_of: Callable[[int], Commit], longest: int, label: str) -> list[Commit]:
    """``last`` and its parents back to a keyframe (or a base-rooted link), that one
    first: what a restore of ``last`` decodes. ``parent_of(step)`` raises NotFound or
    KeyError for a missing parent; a path longer than ``longest`` is a cycle."""
    path = [last]
    while path[-1].parent is not None:
        parent = path[-1].parent
        try:
            path.append(parent_of(parent))
        except (NotFound, KeyError):
            raise CorruptData(f"{label}: step {path[-1].step} needs step {parent}, which is missing; "
                              "restore another step") from None
        if len(path) > longest:
            raise CorruptData(f"{label}: the parents of step {last.step} form a cycle")
    path.reverse()
    return path


_HEADER_FIELDS = {"run": str, "step": int, "parent": (int, type(None)), "keyframe": bool,
                  "params": dict, "num_parameters": int, "raw_bytes": int, "input_digest": str}


def _archive_header(reader: ArchiveReader, summary: ArchiveSummary | None) -> dict[str, Any]:
    """The header of an archive to commit, checked field by field (and, for an
    untrusted archive, every checksum)."""
    if summary is None:
        reader.verify()
    header = reader.header
    for name, kind in _HEADER_FIELDS.items():
        value = header.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidInput(f"{reader.label}: the archive header lacks a valid {name!r}; "
                               "code the archive with this version of excp")
    validate_step(header["step"])
    return header


class Chain:
    """One run in one store. ``place`` is how messages name where the run lives (by
    default the store's URL; a service names itself, see :mod:`excp.place`)."""

    def __init__(self, store: Store, run: str, place: Place | None = None) -> None:
        self.store = store
        self.run = validate_run(run)
        self.place = place or Place.store(store.url)
        self._prefix = f"runs/{run}"

    # --- records -------------------------------------------------------------

    def exists(self) -> bool:
        return self.store.exists(f"{self._prefix}/run.json")

    def config(self) -> dict[str, Any]:
        try:
            data = self.store.get(f"{self._prefix}/run.json")
        except NotFound:
            raise NotFound(f"run {self.run!r} does not exist {self.place.where}: "
                           f"check the name with {self.place.listing()}") from None
        try:
            return json.loads(data)
        except ValueError:
            raise CorruptData(f"run {self.run!r}: run.json is unreadable; run `excp verify`") from None

    def params(self) -> CodecParams:
        return CodecParams.from_dict(self.config()["params"])

    def base(self) -> Base | None:
        base = self.config().get("base")
        return Base(**base) if base else None

    def keep_exact(self) -> int:
        """How many of the newest steps keep an exact copy (:mod:`excp.exact`); 0 for a
        run created before exact copies existed."""
        return int(self.config().get("keep_exact", 0))

    def create(self, params: CodecParams, base: Base | None, kind: str | None = None,
               keep_exact: int = 0) -> None:
        """Write ``run.json`` if the run does not exist yet. ``kind`` marks a run whose
        steps are not this chain's (``sharded``: :mod:`excp.sharded`)."""
        record = {"params": params.to_dict(), "base": asdict(base) if base else None,
                  "keep_exact": keep_exact, "created_at": time.time(), "version": RECORD_VERSION}
        if kind is not None:
            record["kind"] = kind
        self.store.put_if_absent(f"{self._prefix}/run.json", json.dumps(record, indent=1).encode())

    def commits(self) -> list[Commit]:
        keys = self.store.list(f"{self._prefix}/commits/")
        return [self._read_commit(key) for key in keys if key.endswith(".json")]

    def _commit_key(self, step: int) -> str:
        return f"{self._prefix}/commits/{step:012d}.json"

    def _read_commit(self, key: str) -> Commit:
        return Commit.from_json(self.store.get(key), f"run {self.run!r}, {key.rsplit('/', 1)[-1]}")

    def commit(self, step: int) -> Commit:
        key = self._commit_key(validate_step(step))
        if not self.store.exists(key):
            raise NotFound(f"run {self.run!r} has no step {step}: list its steps with "
                           f"{self.place.listing(self.run)}")
        return self._read_commit(key)

    def head(self) -> Commit | None:
        keys = self.store.list(f"{self._prefix}/commits/")
        return self._read_commit(keys[-1]) if keys else None

    def resolve(self, step: int | str) -> int:
        """A step number, or ``latest``."""
        if step == "latest":
            head = self.head()
            if head is None:
                self.config()  # a run that does not exist says so
                raise NotFound(f"run {self.run!r} has no checkpoints yet")
            return head.step
        try:
            return validate_step(int(step))
        except (TypeError, ValueError):
            raise InvalidInput(f"invalid step {step!r}: use a number or 'latest'") from None

    # --- push ----------------------------------------------------------------

    def push(self, bundle: Bundle, step: int, parent_recon: Callable[[Commit], Reconstruction],
             base_recon: Reconstruction | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[PushResult, Reconstruction]:
        """Code ``bundle`` as ``step`` after the head and commit it.

        ``parent_recon(head)`` gives the head's reconstruction (a cache or a decode).
        Returns the result and this step's reconstruction, for the next push.
        """
        validate_step(step)
        head = self.head()
        if head is not None and step <= head.step:
            return self._repush(step, bundle.digest()), {}
        with tempfile.TemporaryFile() as spool:
            summary, recon = encode_archive(self.run, self.params(), head, bundle, step, spool,
                                            parent_recon, base_recon, progress)
            result = self.commit_archive(spool, summary)
        return result, recon if result.created else {}

    def commit_archive(self, archive: BinaryIO, summary: ArchiveSummary | None = None) -> PushResult:
        """Store ``archive`` (coded by :func:`encode_archive`, here or on a training node)
        and commit its step, if it was coded against this run's head.

        Without ``summary`` the archive is untrusted input (an upload): every checksum is
        verified and its digest computed before anything is stored.
        """
        archive.seek(0, io.SEEK_END)
        size = archive.tell()
        archive.seek(0)
        header = _archive_header(ArchiveReader(archive, size, f"run {self.run!r} upload"), summary)
        step, label = header["step"], f"run {self.run!r} step {header['step']}"
        if header["run"] != self.run:
            raise InvalidInput(f"{label}: the archive was coded for run {header['run']!r}; "
                               "upload it to that run")
        if CodecParams.from_dict(header["params"]) != self.params():
            raise ChainMismatch(f"{label}: the archive's codec parameters differ from the run's; "
                                "code it with the run's parameters")
        head = self.head()
        if head is not None and step <= head.step:
            return self._repush(step, header["input_digest"])
        expected = None if header["keyframe"] or head is None else head.step
        if header["parent"] != expected or (head is None and not header["keyframe"] and self.base() is None):
            raise Conflict(f"{label}: the archive was coded against step {header['parent']}, but the "
                           f"run's head is {None if head is None else head.step}; code it against the head")
        if summary is None:
            digest = archive_digest(archive)
        else:
            digest = summary.digest
        key = f"{self._prefix}/archives/{step:012d}-{digest}.excp"
        archive.seek(0)
        self.store.put(key, archive)
        commit = Commit.of_archive(header, key, digest, size, head)
        if not self.store.put_if_absent(self._commit_key(step), commit.to_json()):
            return self._repush(step, header["input_digest"])
        if not self.store.exists(key):  # `excp gc` ran between the two puts (another writer moved the head)
            self.store.delete(self._commit_key(step))
            raise Conflict(f"{label}: the archive was collected as garbage while this push committed "
                           "(another writer moved the head past it); push again")
        return PushResult(commit, True, summary.stream_bytes if summary else {})

    def garbage(self) -> list[str]:
        """Keys no commit record needs: archives of steps up to the head that no commit
        names (a push that died before its commit, a losing racer). Archives after the
        head are left alone: a push in progress writes one before its commit."""
        commits = self.commits()
        if not commits:
            return []
        named = {c.archive for c in commits}
        return [key for key in self.store.list(f"{self._prefix}/archives/")
                if key not in named and _step_of(key) is not None and _step_of(key) <= commits[-1].step]

    def adopt(self, commit: Commit, archive: BinaryIO | None = None) -> None:
        """Store a commit record exactly as another store holds it, with its archive if
        given (first): how a client mirrors the part of a run it needs from a service."""
        if not commit.archive.startswith(f"{self._prefix}/archives/"):
            raise CorruptData(f"run {self.run!r} step {commit.step}: archive key {commit.archive!r} "
                              "is outside the run")
        if archive is not None:
            self.store.put(commit.archive, archive)
        self.store.put_if_absent(self._commit_key(validate_step(commit.step)), commit.to_json())

    def _repush(self, step: int, input_digest: str) -> PushResult:
        """A step at or before the head: a no-op if it is the same checkpoint."""
        try:
            existing = self.commit(step)
        except NotFound:
            raise Conflict(f"run {self.run!r}: step {step} is not after the head step "
                           f"{self.head().step}; push steps in increasing order") from None
        if existing.input_digest != input_digest:
            raise Conflict(f"run {self.run!r} already has a different checkpoint at step {step}; "
                           "push it under a new step or a new --run")
        return PushResult(existing, False, {})

    # --- delete --------------------------------------------------------------

    def dependants(self, step: int) -> list[int]:
        """The steps whose restore decodes ``step``: the links coded against it, the links
        coded against those, and so on up to the next keyframe."""
        through, found = {step}, []
        for commit in self.commits():
            if commit.parent in through:
                through.add(commit.step)
                found.append(commit.step)
        return found

    def delete(self, step: int) -> Commit:
        """Delete ``step`` if no other checkpoint's restore goes through it: the head, or a
        step whose next checkpoint is a keyframe. Any other step is refused (Conflict,
        naming the steps that need it), so a delete never leaves a step that cannot be
        restored.

        The commit record goes first, so a crash between the two deletes leaves an
        unreferenced archive (garbage), never a commit without its archive. Not atomic
        against a concurrent push to the same run: callers serialize the two (the
        server does, per run).
        """
        commit = self.commit(step)
        dependants = self.dependants(step)
        if dependants:
            shown = ", ".join(str(s) for s in dependants[:10]) + (", ..." if len(dependants) > 10 else "")
            raise Conflict(f"run {self.run!r}: step {step} is needed to restore steps {shown}; "
                           "delete those first, newest first, or keep it")
        self.store.delete(self._commit_key(step))
        self.store.delete(commit.archive)
        return commit

    def delete_run(self) -> int:
        """Delete the whole run; returns how many checkpoints it had.

        Commit records go newest first, so an interrupted delete leaves a chain whose
        every remaining step still restores; then the archives (and any garbage), and
        ``run.json`` last, so the run stays listed until nothing else is left.
        """
        self.config()
        commits = self.commits()
        for commit in reversed(commits):
            self.store.delete(self._commit_key(commit.step))
        run_json = f"{self._prefix}/run.json"
        for key in self.store.list(f"{self._prefix}/"):
            if key != run_json:
                self.store.delete(key)
        self.store.delete(run_json)
        return len(commits)

    # --- restore -------------------------------------------------------------

    def path_to(self, step: int) -> list[Commit]:
        """The commits to decode, keyframe (or base-rooted link) first, ``step`` last."""
        return path_back(self.commit(step), self.commit, MAX_STEP, f"run {self.run!r}")

    def read(self, commit: Commit, parent: Reconstruction | None, device: torch.device | str,
             weights_only: bool) -> tuple[Bundle, Reconstruction]:
        label = f"run {self.run!r} step {commit.step}"
        try:
            size = self.store.size(commit.archive)
        except NotFound:
            raise CorruptData(f"{label}: archive {commit.archive} is missing; "
                              "restore another step or push this one again") from None
        if size != commit.size:
            raise CorruptData(f"{label}: archive is {size} bytes, its commit says {commit.size}")
        with self.store.open_read(commit.archive) as handle:
            reader = ArchiveReader(handle, size, label)
            return decode_archive(reader, parent, device, weights_only)

    def restore(self, step: int, device: torch.device | str = "cpu",
                base_recon: Reconstruction | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[Bundle, Reconstruction]:
        """Decode ``step`` by walking from its keyframe (or the rebuilt base)."""
        path = self.path_to(step)
        recon = None
        if not path[0].keyframe:
            recon = self.checked_base(base_recon)
        for i, commit in enumerate(path):
            last = i == len(path) - 1
            bundle, recon = self.read(commit, recon, device, weights_only=not last)
            if progress:
                progress(1)
        return bundle, recon

    def replay(self, base_recon: Reconstruction | None = None, device: torch.device | str = "cpu",
               weights_only: bool = False) -> Iterator[tuple[Commit, Bundle]]:
        """Every checkpoint in step order, each link decoded once (rebuild, verify)."""
        previous: Commit | None = None
        recon: Reconstruction | None = None
        for commit in self.commits():
            if commit.keyframe:
                parent = None
            elif commit.parent is None:
                parent = self.checked_base(base_recon)
            elif previous is not None and commit.parent == previous.step:
                parent = recon
            else:
                raise CorruptData(f"run {self.run!r}: step {commit.step} needs step {commit.parent}, "
                                  "which is missing; restore a step from another segment")
            bundle, recon = self.read(commit, parent, device, weights_only)
            if bundle.step is not None and bundle.step != commit.step:
                raise CorruptData(f"run {self.run!r}: the archive of step {commit.step} "
                                  f"says step {bundle.step}")
            yield commit, bundle
            previous = commit

    def checked_base(self, base_recon: Reconstruction | None) -> Reconstruction:
        base = self.base()
        if base is None:
            raise CorruptData(f"run {self.run!r}: its first link has no keyframe and no base")
        if base_recon is None:
            raise InvalidInput(
                f"run {self.run!r} starts from weights rebuilt from a seed: pass "
                f"--init-seed {base.seed} --model-factory {base.factory}")
        if recon_digest(base_recon) != base.digest:
            raise ChainMismatch(
                f"run {self.run!r}: the rebuilt base weights do not match the run's stored hash; "
                f"use the factory and seed the run was created with ({base.factory}, {base.seed})")
        return base_recon
