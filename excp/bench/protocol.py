"""The two protocols of the ExCP paper, on the project's training workload.

* **Reference run**: the workload trained once without compression; its checkpoints
  are the ones every contender codes, its eval losses the baseline.
* **Open loop**: a contender codes the stored chain of checkpoints and decodes each;
  each reconstruction is compared with its original (bit-exact? relative L2 error of
  weights and moments?) and, on the workload, evaluated: the eval loss it would
  resume from.
* **Closed loop**: a lossy contender's own training run, resumed from every
  reconstruction, so compression error feeds back into training; its final eval
  loss against the reference run's is the number that matters. A contender verified
  bit-exact in the open loop needs no closed loop: training from identical states is
  identical (the workload is deterministic), so its Δ is 0 by verification.

Training is deterministic from ``(seed, step)`` (:mod:`excp.workload.train`), so any
difference between a closed loop and the reference run is the compression's doing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch

from excp import api
from excp.bench.contenders import Contender
from excp.bench.inputs import CheckpointSource
from excp.bench.measure import Measurement, measure
from excp.bundle import Bundle, Role
from excp.chain import raw_size
from excp.workload.train import Trainer, run_chain

Update = Callable[[int], None]
Bar = Callable[[str, int, str], AbstractContextManager[Update]]
"""``bar(description, total, unit)``: a context whose value advances a progress bar."""

ERROR_GROUPS = {Role.WEIGHT: "weight", Role.EXP_AVG: "exp_avg", Role.EXP_AVG_SQ: "exp_avg_sq",
                Role.MAX_EXP_AVG_SQ: "max_exp_avg_sq"}


@contextmanager
def no_bar(description: str, total: int, unit: str) -> Iterator[Update]:
    """A progress bar that shows nothing."""
    yield lambda n: None


@dataclass
class Reference:
    """The uncompressed run: its eval-loss curve, its checkpoints (dicts, dropped once
    the open loops are done with them) and their steps."""

    curve: list[tuple[int, float]]
    checkpoints: list[dict]
    steps: list[int]
    seconds: float

    @property
    def checkpoint_losses(self) -> list[float]:
        """Eval loss of each checkpoint as it was saved (the curve at its step)."""
        at = dict(self.curve)
        return [at[step] for step in self.steps]


@dataclass
class OpenLoop:
    """One contender on a fixed chain: per checkpoint sizes, timings and fidelity."""

    raw_bytes: list[int] = field(default_factory=list)
    stored_bytes: list[int] = field(default_factory=list)
    num_parameters: list[int] = field(default_factory=list)
    encode: list[Measurement] = field(default_factory=list)
    decode: list[Measurement] = field(default_factory=list)
    bit_exact: list[bool] = field(default_factory=list)
    rel_l2: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] | None = None


@dataclass
class ClosedLoop:
    """A training run resumed from every reconstruction of one contender."""

    curve: list[tuple[int, float]]
    raw_bytes: int
    stored_bytes: int
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


def reference_run(config: str, steps: int, every: int, seed: int, bar: Bar = no_bar) -> Reference:
    """Train once without compression, keeping every checkpoint."""
    checkpoints: list[dict] = []
    with bar("reference run (uncompressed)", steps, "step") as update:
        def keep(step: int, checkpoint: dict) -> None:
            checkpoints.append(checkpoint)
            update(every)

        start = time.perf_counter()
        result = run_chain(config, steps, every, seed, keep)
    return Reference(result.curve, checkpoints, [int(c["step"]) for c in checkpoints],
                     time.perf_counter() - start)


class Evaluator:
    """Eval loss of a reconstructed workload checkpoint, with one reused trainer."""

    def __init__(self, config: str, seed: int, steps: int) -> None:
        self._trainer = Trainer(config, seed, total_steps=steps)

    def __call__(self, bundle: Bundle) -> float:
        self._trainer.load_state_dict(api.load_dict(bundle))
        return self._trainer.eval_loss()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included, unlike ``==``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def compare(original: Bundle, decoded: Bundle) -> tuple[bool, dict[str, float]]:
    """Whether ``decoded`` is bit-exact (every tensor and extra), and the relative L2
    error ‖x̂ − x‖ / ‖x‖ of each group of weights and moments (all tensors of a role
    together; a group whose original is all zeros has no relative error and is left out)."""
    exact = original.extras == decoded.extras and set(original.tensors) == set(decoded.tensors)
    squared_error: dict[str, float] = {}
    squared_norm: dict[str, float] = {}
    for name, entry in original.tensors.items():
        match = decoded.tensors.get(name)
        same = match is not None and _bits_equal(entry.tensor, match.tensor)
        exact = exact and same
        group = ERROR_GROUPS.get(entry.role)
        if group is None:
            continue
        x = entry.tensor.detach().double()
        if same:
            error = 0.0
        elif match is None or match.tensor.shape != entry.tensor.shape:
            error = float(x.square().sum())
        else:
            error = float((match.tensor.detach().double() - x).square().sum())
        squared_error[group] = squared_error.get(group, 0.0) + error
        squared_norm[group] = squared_norm.get(group, 0.0) + float(x.square().sum())
    errors = {group: math.sqrt(squared_error[group] / norm)
              for group, norm in squared_norm.items() if norm > 0}
    return exact, errors


def _chain_step(bundle: Bundle, previous: int) -> int:
    """The checkpoint's own step when it has one after the previous, else the next number."""
    step = bundle.step
    return step if isinstance(step, int) and step > previous else previous + 1


def open_loop(contender: Contender, source: CheckpointSource, bar: Bar = no_bar,
              evaluate: Callable[[Bundle], float] | None = None,
              reference_losses: list[float] | None = None) -> OpenLoop:
    """Code the whole chain, then decode each checkpoint and check it.

    With ``evaluate`` (the workload), every reconstruction that is not verified
    bit-exact is evaluated; a bit-exact one has its original's loss
    (``reference_losses``) by verification, not by assumption.
    """
    result = OpenLoop(losses=[] if evaluate is not None else None)
    coder = contender.chain()
    previous = 0
    with bar(f"{contender.name}: encode", len(source), "ckpt") as update:
        for index in range(len(source)):
            bundle = source.bundle(index)
            result.raw_bytes.append(raw_size(bundle))
            result.num_parameters.append(bundle.num_parameters())
            previous = _chain_step(bundle, previous)
            with measure() as timing:
                result.stored_bytes.append(coder.encode(bundle, previous))
            result.encode.append(timing)
            del bundle
            update(1)
    decoded = coder.decode()
    with bar(f"{contender.name}: decode + check", len(source), "ckpt") as update:
        for index in range(len(source)):
            with measure() as timing:
                reconstruction = next(decoded)
            result.decode.append(timing)
            exact, errors = compare(source.bundle(index), reconstruction)
            result.bit_exact.append(exact)
            result.rel_l2.append(errors)
            if result.losses is not None and evaluate is not None:
                known = exact and reference_losses is not None
                result.losses.append(reference_losses[index] if known else evaluate(reconstruction))
            del reconstruction
            update(1)
    return result


def closed_loop(contender: Contender, config: str, steps: int, every: int, seed: int,
                bar: Bar = no_bar) -> ClosedLoop:
    """Train with the contender in the loop: every checkpoint is coded, and training
    resumes from its reconstruction."""
    coder = contender.chain()
    totals = {"raw": 0, "stored": 0}
    with bar(f"{contender.name}: closed loop", steps, "step") as update:
        def resume_from_reconstruction(step: int, checkpoint: dict) -> dict:
            bundle = api.to_bundle(checkpoint)
            totals["raw"] += raw_size(bundle)
            totals["stored"] += coder.encode(bundle, step)
            update(every)
            return api.load_dict(coder.restore_last())

        start = time.perf_counter()
        result = run_chain(config, steps, every, seed, resume_from_reconstruction)
    return ClosedLoop(result.curve, totals["raw"], totals["stored"], time.perf_counter() - start)
