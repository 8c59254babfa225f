"""The Python API: push, restore, ls, inspect, rebuild, verify.

The CLI, the training-loop hook and the REST service are thin shells over these
functions; they take a checkpoint (path, dict or Bundle), a run name and a store
(URL or :class:`~excp.store.Store`), and raise only :class:`~excp.errors.ExcpError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from excp.adapters import load_checkpoint, save_checkpoint, state_dict, torch_dict
from excp.bundle import FLOAT_DTYPES, Bundle
from excp.cache import ReconCache
from excp.chain import Base, Chain, Commit, Head, PushResult, recon_digest
from excp.codec.params import CodecParams
from excp.codec.pipeline import Reconstruction
from excp.errors import InvalidInput
from excp.exact import ExactCommit, ExactCopies, on_cpu, validate_keep
from excp.format.container import ArchiveReader
from excp.store import Store, open_store

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class BaseSpec:
    """How to rebuild a run's initial weights: ``factory`` is ``pkg.module:fn`` and
    ``fn(seed)`` returns an ``nn.Module`` or a state dict."""

    seed: int
    factory: str


def _device(name: str) -> torch.device:
    """A device restore can decode on, or a clear error naming the fix."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device {name!r} is not supported: use cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidInput(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s), cuda:0 to cuda:N-1")
    return device


def _store(store: str | Store | None) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def build_base(spec: BaseSpec) -> Reconstruction:
    """The floating-point tensors of ``factory(seed)``'s state dict."""
    module_name, _, attr = spec.factory.partition(":")
    if not module_name or not attr:
        raise InvalidInput(f"model factory {spec.factory!r} must look like pkg.module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"cannot load model factory {spec.factory!r}: {exc}") from None
    made = fn(spec.seed)
    state = made.state_dict() if isinstance(made, torch.nn.Module) else made
    if not isinstance(state, dict):
        raise InvalidInput(f"model factory {spec.factory!r} returned {type(made).__name__}, "
                           "not an nn.Module or a state dict")
    return {k: v.detach() for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.dtype in FLOAT_DTYPES}


def to_bundle(checkpoint: str | Path | Bundle | dict) -> Bundle:
    """A path (any layout), a checkpoint dict, a bare state dict, or a Bundle as is."""
    if isinstance(checkpoint, Bundle):
        return checkpoint
    if isinstance(checkpoint, dict):
        if torch_dict.model_key(checkpoint) is None and state_dict.is_state_dict(checkpoint):
            return state_dict.to_bundle(checkpoint)
        return torch_dict.to_bundle(checkpoint)
    return load_checkpoint(checkpoint)


def _ensure_run(chain: Chain, params: CodecParams | None, base: BaseSpec | None,
                base_recon: Callable[[], Reconstruction | None], keep_exact: int | None) -> None:
    """Create the run on first push; check the options of a later push against it."""
    if not chain.exists():
        recon = base_recon()
        record = Base(base.seed, base.factory, recon_digest(recon)) if base and recon is not None else None
        chain.create(params or CodecParams(), record, keep_exact=keep_exact or 0)
        return
    check_options(chain.run, chain.params(), chain.base(), params, base)
    check_keep_exact(chain.run, chain.keep_exact(), keep_exact)


def check_keep_exact(run: str, stored: int, keep_exact: int | None) -> None:
    """A later push's ``keep_exact`` (None: whatever the run has) against the run's own."""
    if keep_exact is not None and validate_keep(keep_exact) != stored:
        raise InvalidInput(f"run {run!r} was created keeping exact copies of the newest {stored} steps, "
                           f"not {keep_exact}: drop the option, pass {stored}, or push to a new --run")


def check_options(run: str, stored_params: CodecParams, stored_base: Base | None,
                  params: CodecParams | None, base: BaseSpec | None) -> None:
    """A later push's options (None: whatever the run has) against the run's own."""
    if params is not None and params != stored_params:
        raise InvalidInput(
            f"run {run!r} was created with different codec options "
            f"({stored_params.to_dict()}); drop the options or push to a new --run")
    if base is not None and (stored_base is None or (stored_base.seed, stored_base.factory)
                             != (base.seed, base.factory)):
        created = "without a seed base" if stored_base is None else \
            f"from --init-seed {stored_base.seed} --model-factory {stored_base.factory}"
        raise InvalidInput(f"run {run!r} was created {created}: push with the same base "
                           "options or to a new --run")


def push(checkpoint: str | Path | Bundle | dict, run: str, *, step: int | None = None,
         store: str | Store | None = None, params: CodecParams | None = None,
         base: BaseSpec | None = None, parent: Head | None = None,
         progress: Progress = None, keep_exact: int | None = None) -> tuple[PushResult, Reconstruction]:
    """Compress ``checkpoint`` as step ``step`` of ``run`` and commit it.

    ``keep_exact``: for a new run, how many of the newest steps also keep an exact copy
    (default 0); for an existing run, None or the number it was created with. A step
    pushed again (a no-op) gets the exact copy it lacks, if it is among those steps.

    ``parent`` is the last step this caller pushed and its reconstruction (the hook
    keeps it); it is used only while that step is still the run's head. Otherwise the
    head's reconstruction comes from the local cache or by decoding the chain. The base
    model is only rebuilt when it is needed: creating the run, coding the first link,
    or decoding a chain that starts from it. Returns the result and this step's
    reconstruction.
    """
    bundle = to_bundle(checkpoint)
    step = bundle.step if step is None else step
    if step is None:
        raise InvalidInput("this checkpoint does not say its step: pass --step N")
    if keep_exact is not None:
        validate_keep(keep_exact)
    st = _store(store)
    chain = Chain(st, run)
    built: dict[str, Reconstruction | None] = {}

    def base_recon() -> Reconstruction | None:
        if "base" not in built:
            built["base"] = _base_for(base)
        return built["base"]

    _ensure_run(chain, params, base, base_recon, keep_exact)
    cache = ReconCache(st.url, run)
    parent_of = head_recon(parent, cache, lambda head: chain.restore(head.step, base_recon=base_recon())[1])
    used: list[Reconstruction] = []

    def coded_against(head: Commit) -> Reconstruction:
        used.append(parent_of(head))
        return used[-1]

    first = base_recon() if chain.head() is None else None
    result, recon = chain.push(bundle, step, coded_against, first, progress)
    if result.created:
        cache.put(step, result.commit.digest, recon)
    keep = chain.keep_exact()
    if keep and chain.params().mode != "lossless":
        _keep_exact_copy(chain, bundle, result, used[-1] if used else first, base_recon, keep)
    return result, recon


def _keep_exact_copy(chain: Chain, bundle: Bundle, result: PushResult, parent: Reconstruction | None,
                     base_recon: Callable[[], Reconstruction | None], keep: int) -> None:
    """Store the exact copy of the step just pushed, coded against its link as restored
    on the CPU (from the reconstruction it was coded against), then drop the copies of
    steps beyond the newest ``keep``. A step pushed again gets its copy only if it lacks
    one and is still among the newest ``keep``."""
    copies = ExactCopies(chain.store, chain.run)
    steps = [c.step for c in chain.commits()]
    commit = result.commit
    if not result.created:
        if commit.step not in steps[-keep:] or copies.of(commit) is not None:
            return
        lossy, _ = chain.restore(commit.step, base_recon=base_recon())
    else:
        lossy, _ = chain.read(commit, on_cpu(parent), "cpu", weights_only=False)
    copies.write(bundle, lossy, commit, chain.params().zstd_level)
    copies.retain(keep, steps)


def head_recon(parent: Head | None, cache: ReconCache, decode: Callable[[Commit], Reconstruction]
               ) -> Callable[[Commit], Reconstruction]:
    """Where the head's reconstruction comes from, cheapest first: the pusher's own
    ``parent`` if it is of the head, the local cache if its entry is, else a decode."""
    def recon_of(head: Commit) -> Reconstruction:
        if parent is not None and parent.commit.digest == head.digest:
            return parent.recon
        cached = cache.get(head.step, head.digest)
        return cached if cached is not None else decode(head)
    return recon_of


def _base_for(base: BaseSpec | None) -> Reconstruction | None:
    return build_base(base) if base else None


def restore(run: str, step: int | str = "latest", out: str | Path | None = None, *,
            store: str | Store | None = None, device: str = "cpu", base: BaseSpec | None = None,
            progress: Progress = None, lossy: bool = False) -> Bundle:
    """Reconstruct ``step`` (or ``latest``); write it to ``out`` in the layout it was
    pushed in, if given. Returns the bundle.

    A step with an exact copy comes back bit for bit, unless ``lossy`` asks for its
    link's reconstruction (what the chain codes the next link against)."""
    chain = Chain(_store(store), run)
    if lossy:
        check_lossy(run, chain.params())
    if _is_sharded(chain):
        bundle = _sharded_bundle(chain, step, device, lossy)
    else:
        number = chain.resolve(step)
        exact = None if lossy else ExactCopies(chain.store, run).of(chain.commit(number))
        if exact is None:
            bundle, _ = chain.restore(number, _device(device), _base_for(base), progress)
        else:
            bundle = _exact_bundle(chain, exact, _device(device), _base_for(base), progress)
    if out is not None:
        save_checkpoint(bundle, out)
    return bundle


def check_lossy(run: str, params: CodecParams) -> None:
    """A lossy restore needs a lossy run: a lossless-mode run has no other reconstruction."""
    if params.mode == "lossless":
        raise InvalidInput(f"run {run!r} was pushed with --mode lossless: every step is stored exactly "
                           "and has no lossy reconstruction; restore without --lossy")


def _exact_bundle(chain: Chain, exact: ExactCommit, device: torch.device,
                  base_recon: Reconstruction | None, progress: Progress) -> Bundle:
    """A step restored bit for bit: its link decoded on the CPU (as it was when the exact
    copy was coded against it), corrected, then moved to ``device``."""
    lossy, _ = chain.restore(exact.step, "cpu", base_recon, progress)
    bundle = ExactCopies(chain.store, chain.run).apply(exact, lossy)
    if device.type != "cpu":
        for entry in bundle.tensors.values():
            entry.tensor = entry.tensor.to(device)
    return bundle


def exact_steps(run: str, store: str | Store | None = None) -> list[int]:
    """The steps of ``run`` that restore bit for bit: those with an exact copy of their
    link, and every step of a lossless-mode run."""
    chain = Chain(_store(store), run)
    if _is_sharded(chain):
        return _sharded_exact_steps(chain)
    commits = chain.commits()
    if chain.params().mode == "lossless":
        return [c.step for c in commits]
    copies = {r.step: r.link for r in ExactCopies(chain.store, run).records()}
    return [c.step for c in commits if copies.get(c.step) == c.digest]


def _sharded_exact_steps(chain: Chain) -> list[int]:
    """The steps of a sharded run with an exact copy of every rank's link."""
    from excp.sharded.exact import ShardedCopies
    from excp.sharded.records import ShardedRun

    sharded = ShardedRun(chain.store, chain.run)
    commits = {c.step: c for c in sharded.commits()}
    return [r.step for r in ShardedCopies(sharded).records()
            if r.step in commits and r.corrects(commits[r.step])]


def _sharded_bundle(chain: Chain, step: int | str, device: str, lossy: bool = False) -> Bundle:
    """A torch.distributed.checkpoint step as one ordinary checkpoint (the state dict
    passed to ``dcp.save``, DTensors as full tensors), assembled in this process: bit
    for bit where it has an exact copy, unless ``lossy``."""
    from excp.sharded.reader import load_state_dict  # torch.distributed loads only for sharded runs
    from excp.sharded.records import ShardedRun

    number = ShardedRun(chain.store, chain.run).resolve(step).step
    state = load_state_dict(chain.store, chain.run, number, str(_device(device)), lossy)
    if torch_dict.model_key(state) is None and not state_dict.is_state_dict(state):
        raise InvalidInput(f"run {chain.run!r} step {number} was saved from a state dict without a model "
                           "state dict under 'model': load it with excp.dcp.ExcpStorageReader")
    bundle = to_bundle(state)
    bundle.step = number
    return bundle


def load_dict(bundle: Bundle) -> dict[str, Any]:
    """A restored bundle of a torch.save'd dict, as that dict."""
    return torch_dict.from_bundle(bundle)


def list_runs(store: str | Store | None = None) -> list[str]:
    keys = _store(store).list("runs/")
    return sorted({k.split("/")[1] for k in keys if k.endswith("/run.json")})


def list_commits(run: str, store: str | Store | None = None) -> list[Commit]:
    """The run's commit records in step order (for a sharded run, one summary row per
    step: see :meth:`excp.sharded.records.ShardedCommit.summary`)."""
    chain = Chain(_store(store), run)
    if _is_sharded(chain):
        from excp.sharded.records import ShardedRun

        return [c.summary() for c in ShardedRun(chain.store, run).commits()]
    return chain.commits()


def _is_sharded(chain: Chain) -> bool:
    return chain.config().get("kind") == "sharded"


def inspect_archive(path: str | Path | None = None, *, run: str | None = None,
                    step: int | str | None = None, store: str | Store | None = None) -> dict[str, Any]:
    """An archive's header (codec parameters), tensor table and stream sizes."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise InvalidInput(f"{path} is not a file: pass an .excp archive or --run/--step")
        with open(file, "rb") as handle:
            return _describe(ArchiveReader(handle, file.stat().st_size, str(path)))
    if run is None:
        raise InvalidInput("inspect needs an archive path or --run (and --step)")
    chain = Chain(_store(store), run)
    commit = chain.commit(chain.resolve(step if step is not None else "latest"))
    with chain.store.open_read(commit.archive) as handle:
        info = _describe(ArchiveReader(handle, commit.size, f"run {run!r} step {commit.step}"))
    info["commit"] = commit.__dict__
    return info


def _describe(reader: ArchiveReader) -> dict[str, Any]:
    units = []
    for unit in reader.units:
        units.append({
            "name": unit.name, "codec": unit.codec, "meta": unit.meta,
            "tensors": unit.tensors,
            "streams": {name: {"raw": s["size"], "stored": sum(c[1] for c in s["chunks"]),
                               "chunks": len(s["chunks"]),
                               "xxh64": [c[3] for c in s["chunks"]]}
                        for name, s in unit.streams.items()},
        })
    return {"header": reader.header, "units": units,
            "extras": {name: e["size"] for name, e in reader.extras.items()}}


def rebuild(run: str, out_dir: str | Path, *, store: str | Store | None = None,
            base: BaseSpec | None = None, progress: Progress = None) -> list[Path]:
    """Write every checkpoint of the run, in step order, decoding each link once (the
    steps of a sharded run are each assembled whole, as ``restore(lossy=True)`` does):
    each link's reconstruction."""
    chain = Chain(_store(store), run)
    chain.config()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"{out} exists and is not an empty directory: pick a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if _is_sharded(chain):
        for row in list_commits(run, chain.store):
            written.append(save_checkpoint(_sharded_bundle(chain, row.step, "cpu", lossy=True),
                                           out / f"step-{row.step:012d}.pt"))
            if progress:
                progress(1)
        return written
    for commit, bundle in chain.replay(_base_for(base)):
        suffix = "" if bundle.layout == "hf_trainer" else ".pt"
        written.append(save_checkpoint(bundle, out / f"step-{commit.step:012d}{suffix}"))
        if progress:
            progress(1)
    return written


@dataclass
class GcReport:
    keys: list[str]
    bytes: int


def gc(run: str | None = None, *, store: str | Store | None = None, dry_run: bool = False) -> GcReport:
    """Delete what no commit record needs (every run, or ``run``): archives of pushes
    that died before their commit. Committed data is never touched, and a push in
    progress (its step after the head) is left alone, so gc may run beside writers."""
    st = _store(store)
    report = GcReport([], 0)
    for name in [run] if run is not None else list_runs(st):
        chain = Chain(st, name)
        if _is_sharded(chain):
            from excp.sharded.exact import ShardedCopies
            from excp.sharded.records import ShardedRun

            sharded = ShardedRun(st, name)
            keys = sharded.garbage() + ShardedCopies(sharded).garbage(sharded.commits())
        else:
            keys = chain.garbage() + ExactCopies(st, name).garbage(chain.commits())
        for key in keys:
            report.bytes += st.size(key)
            if not dry_run:
                st.delete(key)
        report.keys += keys
    return report


@dataclass
class VerifyReport:
    checkpoints: int
    bytes_checked: int


def verify(run: str, *, store: str | Store | None = None, base: BaseSpec | None = None,
           progress: Progress = None) -> VerifyReport:
    """Check every archive's checksums and that every link decodes, in chain order."""
    chain = Chain(_store(store), run)
    if _is_sharded(chain):
        from excp.sharded.reader import verify as verify_sharded

        return VerifyReport(*verify_sharded(chain.store, run, progress))
    report = VerifyReport(0, 0)
    for commit, _ in chain.replay(_base_for(base), weights_only=True):
        with chain.store.open_read(commit.archive) as handle:
            ArchiveReader(handle, commit.size, f"run {run!r} step {commit.step}").verify()
        report.checkpoints += 1
        report.bytes_checked += commit.size
        if progress:
            progress(1)
    copies = ExactCopies(chain.store, run)
    for record in copies.records():
        copies.verify(record)
        report.bytes_checked += record.size
    return report
