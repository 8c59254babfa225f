"""The training-loop hook: one line saves a compressed checkpoint in the background.

::

    ckpt = Checkpointer(run="gpt-1", target="excp://ckpt-server:8080", every=500)
    for step in range(1, steps + 1):
        train_one_step()
        ckpt.step(step, model, optimizer, scheduler=scheduler.state_dict())
    ckpt.close()

What the training loop waits for is the *snapshot*: a device-to-device copy of the
model and optimizer state (on the GPU when training on one). Building the bundle,
coding it against the previous reconstruction (on the tensors' device) and uploading
it happen on one background thread.

Memory is bounded: at most one checkpoint is in flight (its snapshot and the archive
being coded) plus the previous step's reconstruction (the weights, as restored), which
the hook keeps so that each link is coded against exactly what a restore gives back.
When a save comes while the previous one is still running, ``when_busy`` decides:
``"wait"`` (default) blocks until it is done and adds the time to ``stats.waited_s``;
``"skip"`` drops this save with a log line and counts it in ``stats.skipped``.

Failures are never swallowed: the target retries (the HTTP client with backoff, S3
with botocore's), and an error that persists is raised by the next ``step``/``save``
or by ``wait``/``close``. A step is committed whole or not at all — the archive is
stored before its commit record, and the service commits an upload only once it has
all of it and every checksum holds — so a training process killed mid-save leaves the
previous steps restorable and nothing half-written that counts.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from excp.adapters import load_checkpoint, torch_dict
from excp.adapters import state_dict as state_dict_layout
from excp.adapters.skeleton import alias_key
from excp.api import BaseSpec
from excp.bundle import Bundle, Role
from excp.chain import Commit, Head, PushResult, validate_run
from excp.client.target import open_target
from excp.codec.params import CodecParams, params_of
from excp.codec.pipeline import reconstruction_of
from excp.errors import Conflict, ExcpError, InvalidInput, NotFound
from excp.exact import validate_keep
from excp.store import Store
from excp.target import Target, is_service_url
from excp.units import human_bytes

log = logging.getLogger("excp.client")
saves_log = logging.getLogger("excp.client.saves")  # one INFO line per save pushed

WHEN_BUSY = ("wait", "skip")


@dataclass
class HookStats:
    """What the hook cost the training loop and what it stored.

    ``snapshot_s``: time the loop spent copying state, or reading a checkpoint the
    framework wrote (the stall per save);
    ``waited_s``: time spent waiting for the previous save (``when_busy="wait"``);
    ``push_s``: time the background thread spent coding and uploading (if it nears
    ``every`` steps' worth of training, saves start to wait or be skipped).
    """

    saves: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    snapshot_s: float = 0.0
    waited_s: float = 0.0
    push_s: float = 0.0
    stored_bytes: int = 0
    raw_bytes: int = 0
    last: Commit | None = None
    commits: list[Commit] = field(default_factory=list, repr=False)

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None


class Checkpointer:
    """Saves compressed checkpoints of one run from a training loop.

    ``target``: a store URL (a directory, ``s3://…``, ``memory://…``), a service URL
    (``excp://host:port``, with ``token`` or ``$EXCP_TOKEN``), a Store or a Target;
    ``None`` means ``$EXCP_STORE`` or ``./excp-store``. ``every``: :meth:`step` saves
    when ``step % every == 0``. ``preset``: codec options for a new run (a preset name
    or :class:`CodecParams`); an existing run keeps its own. ``base``: start the chain
    from weights rebuilt from a seed. ``keep_exact``: for a new run, keep an exact copy
    of the newest K saves beside the lossy chain (default 0: none; see
    :func:`excp.api.push`), so a job resumed from its latest save continues bit for bit;
    an existing run keeps its own (None) or must be given the same K.
    ``client_options`` (``retries``, ``backoff``, ``timeout``, ``retry_refused``) tune
    the HTTP client. Unlike the CLI, the hook retries a refused connection like any
    other failure (``retry_refused=True``): a service being restarted refuses
    connections for a while, and a training job should outlive that.
    """

    def __init__(self, run: str, target: str | Store | Target | None = None, *, every: int = 1000,
                 preset: str | CodecParams | None = None, token: str | None = None,
                 base: BaseSpec | None = None, when_busy: str = "wait",
                 keep_exact: int | None = None, **client_options: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInput(f"every={every!r}: save every N steps with an integer N >= 1")
        if when_busy not in WHEN_BUSY:
            raise InvalidInput(f"when_busy={when_busy!r}: use 'wait' (block until the previous save "
                               "is done) or 'skip' (drop this save)")
        self.run, self.every, self.when_busy, self.base = validate_run(run), every, when_busy, base
        self.keep_exact = None if keep_exact is None else validate_keep(keep_exact)
        self.params = params_of(preset)
        if isinstance(target, str) and is_service_url(target):
            client_options.setdefault("retry_refused", True)
        self.target = open_target(target, token, **client_options)
        self.stats = HookStats()
        self._head: Head | None = None
        self._pending: Future[PushResult] | None = None
        self._pending_step: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="excp-hook")
        self._lock = threading.Lock()
        self._closed = False

    # --- saving ---------------------------------------------------------------------

    def step(self, step: int, model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict | None
             = None, **extra: Any) -> bool:
        """Save if ``step`` is a multiple of ``every``; returns whether a save was queued."""
        if step <= 0 or step % self.every:
            self._raise_failure()
            return False
        return self.save(step, model, optimizer, **extra)

    def save(self, step: int, model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict | None
             = None, **extra: Any) -> bool:
        """Snapshot ``{"model", "optimizer", "step", **extra}`` now and push it in the
        background as ``step``. Returns False if it was skipped (``when_busy="skip"``)."""
        state: dict[str, Any] = {"model": _state_dict(model, "model")}
        if optimizer is not None:
            state["optimizer"] = _state_dict(optimizer, "optimizer")
        state["step"] = step
        state.update(extra)
        order = [n for n, _ in model.named_parameters()] if isinstance(model, torch.nn.Module) else None
        return self.save_state(step, state, order)

    def save_state(self, step: int, state: dict, param_order: list[str] | None = None) -> bool:
        """Snapshot any checkpoint dict (e.g. Lightning's) and push it in the background.
        ``param_order`` pairs an optimizer that does not record parameter names."""
        if not self._make_room(step):
            return False
        started = time.perf_counter()
        snapshot = _snapshot(state)
        ready = _cuda_event()
        loop_s = time.perf_counter() - started

        def build() -> Bundle:
            if ready is not None:
                torch.cuda.current_stream().wait_event(ready)
            bundle = torch_dict.to_bundle(snapshot, param_order=param_order) \
                if torch_dict.model_key(snapshot) is not None else state_dict_layout.to_bundle(snapshot)
            return bundle

        self._submit(step, build, loop_s)
        return True

    def save_from_disk(self, step: int, path: str | Path, param_order: list[str] | None = None) -> bool:
        """Read the checkpoint a framework wrote at ``path`` now, on the caller's thread
        (the framework may delete it soon), and push it in the background. The read is
        this save's stall of the training loop, counted in ``stats.snapshot_s``."""
        if not self._make_room(step):
            return False
        started = time.perf_counter()
        bundle = load_checkpoint(path, param_order=param_order)
        self._submit(step, lambda: bundle, time.perf_counter() - started)
        return True

    def _make_room(self, step: int) -> bool:
        """Raise a past failure; then wait for (or skip behind) the save in flight."""
        if self._closed:
            raise InvalidInput(f"run {self.run!r}: this Checkpointer is closed; make a new one")
        self._raise_failure()
        if self._pending is not None and not self._pending.done():
            if self.when_busy == "skip":
                self.stats.skipped += 1
                log.warning("excp: run %s: step %d skipped, step %s is still being saved "
                            "(when_busy='skip')", self.run, step, self._pending_step)
                return False
            started = time.perf_counter()
            self._wait_pending()
            self.stats.waited_s += time.perf_counter() - started
        self._raise_failure()
        return True

    def _submit(self, step: int, build: Callable[[], Bundle], loop_s: float) -> None:
        """Count the save and its stall of the loop; push it on the hook's thread."""
        self.stats.saves += 1
        self.stats.snapshot_s += loop_s
        self._pending_step = step
        self._pending = self._pool.submit(self._push, step, build, loop_s)

    def _push(self, step: int, build: Callable[[], Bundle], loop_s: float) -> PushResult:
        """The background half of a save (one at a time, on the hook's thread)."""
        started = time.perf_counter()
        bundle = build()
        result, recon = self.target.push(bundle, self.run, step=step, params=self.params, base=self.base,
                                         parent=self._head, keep_exact=self.keep_exact)
        with self._lock:
            if result.created:
                self._head = Head(result.commit, recon)
                self.stats.committed += 1
                self.stats.stored_bytes += result.commit.size
                self.stats.raw_bytes += result.commit.raw_bytes
                self.stats.commits.append(result.commit)
            self.stats.last = result.commit
            push_s = time.perf_counter() - started
            self.stats.push_s += push_s
        commit = result.commit
        saves_log.info("excp: run %s step %d %s: %s, %s stored (%.1fx); %.2f s on the training loop, "
                       "%.1f s in the background", self.run, step,
                       "committed" if result.created else "already stored",
                       "keyframe" if commit.keyframe else f"link {commit.depth}", human_bytes(commit.size),
                       commit.ratio, loop_s, push_s)
        return result

    def _wait_pending(self) -> None:
        if self._pending is not None:
            try:
                self._pending.exception()
            except BaseException:  # noqa: BLE001 (a cancelled future: reported by _raise_failure)
                pass

    def _raise_failure(self) -> None:
        """Raise the error of a finished save that failed (once)."""
        pending, step = self._pending, self._pending_step
        if pending is None or not pending.done():
            return
        self._pending = None
        error = pending.exception()
        if error is None:
            return
        self.stats.failed += 1
        self._head = None  # what the target holds is unknown now: the next push asks it
        if isinstance(error, ExcpError):
            raise type(error)(f"run {self.run!r} step {step} was not saved: {error.message}") from error
        raise error

    def wait(self) -> Commit | None:
        """Block until the save in flight is committed; raise its error if it failed.
        Returns the last commit."""
        self._wait_pending()
        self._raise_failure()
        return self.stats.last

    def close(self) -> Commit | None:
        """Finish the save in flight (raising its error, if any) and release the target."""
        if self._closed:
            return self.stats.last
        try:
            return self.wait()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self.target.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the loop is already failing: finish quietly, its exception wins
            self.close()
        except Exception as err:  # noqa: BLE001
            log.error("excp: run %s: the last save failed too: %s", self.run, err)

    # --- resuming -------------------------------------------------------------------

    def check_start(self, step: int) -> None:
        """Refuse to train into a run that already has checkpoints after ``step`` (a
        rerun, or a resume from an earlier step): its first save would be refused as a
        different checkpoint at a stored step, but only after a save interval of training."""
        try:
            later = [c.step for c in self.target.commits(self.run) if c.step > step]
        except NotFound:
            return
        if later:
            raise Conflict(f"run {self.run!r} already has checkpoints after step {step} (up to "
                           f"{later[-1]}): resume from its latest step or push to a new run name")

    def restore(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                step: int | str = "latest", device: str | None = None) -> dict | None:
        """Load ``step`` of this run into ``model``/``optimizer`` (bit for bit where it has
        an exact copy) and keep its reconstruction as the parent of the next save (after
        an exact restore, the next push finds the link's in the cache or decodes it).
        Returns the checkpoint dict, or None if the run has no checkpoint yet (start
        from scratch)."""
        self.wait()
        try:
            commits = self.target.commits(self.run)
        except NotFound:
            return None
        if not commits and step == "latest":
            return None
        chosen = commits[-1] if step == "latest" else _commit_at(commits, self.run, step)
        mode = self.target.params(self.run).mode
        # Asked before the restore: a copy dropped meanwhile only makes the restore lossy.
        exact = mode != "lossless" and chosen.step in self.target.exact_steps(self.run)
        bundle = self.target.restore(self.run, chosen.step, device=device or _device_of(model),
                                     base=self.base)
        checkpoint = _load_into(bundle, self.run, model, optimizer)
        if chosen.step == commits[-1].step and not exact:  # links are coded against the lossy restore
            recon = {name: t if bundle.tensors[name].role is Role.WEIGHT else t.clone()
                     for name, t in reconstruction_of(bundle, mode).items()}
            self._head = Head(chosen, recon)
        return checkpoint


def follow_saves(run: str, target: str | Store | Target | None, how_often: str,
                 **options: Any) -> Checkpointer:
    """The Checkpointer of a framework callback: the framework decides when to save, and
    each checkpoint it saves is pushed. ``options`` are Checkpointer's, but ``every``."""
    if "every" in options:
        raise InvalidInput(f"the callback takes no 'every': it pushes each checkpoint the framework saves; "
                           f"{how_often} instead")
    return Checkpointer(run, target, every=1, **options)


def restore(run: str, step: int | str = "latest", model: torch.nn.Module | None = None,
            optimizer: torch.optim.Optimizer | None = None, *, target: str | Store | Target | None = None,
            token: str | None = None, device: str | None = None, out: str | Path | None = None,
            base: BaseSpec | None = None, lossy: bool = False) -> dict | Bundle:
    """Restore checkpoint ``step`` (or ``latest``) of ``run`` from a store or a service,
    bit for bit where it has an exact copy unless ``lossy`` asks for its link's
    reconstruction.

    With ``model``/``optimizer``, their states are loaded (on ``device``, default the
    model's) and the checkpoint dict is returned, with anything else that was saved
    (``step``, scheduler state, ...). With ``out``, the checkpoint is also written there
    in the layout it was pushed in (a Hugging Face Trainer checkpoint goes back into a
    directory, ready for ``trainer.train(resume_from_checkpoint=out)``), and the bundle
    is returned.
    """
    with open_target(target, token) as opened:
        bundle = opened.restore(run, step, out, device=device or _device_of(model), base=base, lossy=lossy)
    if out is not None and model is None and optimizer is None:
        return bundle
    return _load_into(bundle, run, model, optimizer)


def _load_into(bundle: Bundle, run: str, model: torch.nn.Module | None,
               optimizer: torch.optim.Optimizer | None) -> dict:
    if bundle.layout == torch_dict.LAYOUT:
        checkpoint = torch_dict.from_bundle(bundle)
        model_state = checkpoint[torch_dict.model_key(checkpoint)]
    elif bundle.layout == state_dict_layout.LAYOUT:
        model_state = state_dict_layout.from_bundle(bundle)
        checkpoint = {"model": model_state}
    else:
        raise InvalidInput(f"run {run!r} holds {bundle.layout} checkpoints, which are directories: restore "
                           "with out=DIR (or `excp restore -o DIR`) and resume from that directory")
    if model is not None:
        model.load_state_dict(model_state)
    if optimizer is not None:
        found = torch_dict.optimizer_states(checkpoint)
        if not found:
            raise InvalidInput(f"run {run!r}: this checkpoint holds no optimizer state; "
                               "restore the model alone")
        optimizer.load_state_dict(found[0])
    return checkpoint


def _commit_at(commits: list[Commit], run: str, step: int | str) -> Commit:
    try:
        number = int(step)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid step {step!r}: use a number or 'latest'") from None
    for commit in commits:
        if commit.step == number:
            return commit
    raise NotFound(f"run {run!r} has no step {number}: list its steps with `excp ls --run {run}`")


def _state_dict(obj: Any, what: str) -> dict:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise InvalidInput(f"{what} is a {type(obj).__name__}: pass the {what} itself or its state_dict()")


def _device_of(model: torch.nn.Module | None) -> str:
    if model is None:
        return "cpu"
    first = next(iter(model.parameters()), None)
    return str(first.device) if first is not None else "cpu"


def _snapshot(obj: Any, memo: dict | None = None) -> Any:
    """A copy of a checkpoint object that training cannot change: every tensor cloned
    on its own device (tensors that shared memory still share it), containers rebuilt,
    other values deep-copied."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = alias_key(obj)
        if key not in memo:
            memo[key] = obj.detach().clone()
        return memo[key]
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = _snapshot(value, memo)
        return out
    if isinstance(obj, list):
        return [_snapshot(v, memo) for v in obj]
    if type(obj) is tuple:
        return tuple(_snapshot(v, memo) for v in obj)
    return copy.deepcopy(obj)


def _cuda_event() -> torch.cuda.Event | None:
    """An event after the snapshot's copies for the hook's thread to wait on, when CUDA
    is in use (the copies are queued on the training loop's stream, not finished)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    event = torch.cuda.Event()
    event.record()
    return event
