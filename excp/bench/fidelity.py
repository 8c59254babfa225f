"""Resume fidelity over a grid of training regimes: does a run resumed from excp's
reconstruction train like the run resumed from the original?

Each regime is one training run of the workload GPT (model, learning rate, β2,
checkpoint interval, warm-up) trained once uncompressed — the reference, whose
continuation from any checkpoint is also the uncompressed resume, since training is
deterministic — and then, per codec preset, under two protocols:

* **closed loop**: every checkpoint is pushed and training resumes from its
  reconstruction, so compression error feeds back; the eval loss at every checkpoint
  and at the end is compared with the reference's at the same step;
* **resume once**: the reference's checkpoints are pushed as a chain (the run itself
  never touches a reconstruction) and training resumes once, from the reconstruction
  of checkpoint N (one in warm-up, one late in the schedule), for ``horizon`` steps:
  the train loss at each of those steps (same batches) against the reference's, the
  eval loss at the end, and the relative difference of the first Adam update.

Deviations count in either direction: a lower loss is as much a change of the run's
course as a higher one. Ratios are against fp32 weights plus both moments.

The **bf16 control** runs both protocols with no codec at all: the checkpoint's weights
rounded to bfloat16 (a relative error of at most 2^-9, what mixed-precision training
applies to every forward pass) and its optimizer state exact. How far that moves the
loss is the regime's sensitivity to any perturbation of its state; a codec's deviation
is read against it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from excp import api
from excp.chain import Head
from excp.codec.params import CodecParams
from excp.store import MemoryStore
from excp.workload.corpus import vocab_size
from excp.workload.model import GPTConfig
from excp.workload.train import TrainConfig, Trainer

Log = Callable[[str], None]
HORIZON = 100
CONTROL = "bf16 control"


def bf16_weights(state: dict) -> dict:
    """A copy of the checkpoint with its floating-point weights rounded to bfloat16 and
    back; the optimizer state, schedule and step exact (copied: resuming mutates them)."""
    state = copy.deepcopy(state)
    state["model"] = {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    return state


@dataclass(frozen=True)
class Regime:
    """One training run: the base regime with one thing changed."""

    name: str
    model: str = "small"
    lr: float = 1e-3
    beta2: float = 0.95
    every: int = 100
    steps: int = 600
    warmup: int = 150
    batch_size: int = 16
    phases: tuple[int, ...] = (100, 500)  # resume-once checkpoints: in warm-up, late

    def config(self) -> str | GPTConfig:
        return MEDIUM if self.model == "medium" else self.model

    def train(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, lr=self.lr, betas=(0.9, self.beta2),
                           warmup_steps=self.warmup)


# A GPT of 19M parameters that trains at ~0.4 s/step on two CPU cores (batch 8).
MEDIUM = GPTConfig(vocab_size(), block_size=64, n_layer=6, n_head=8, n_embd=512)

GRID: list[Regime] = [
    Regime("base"),
    Regime("beta2=0.999", beta2=0.999),
    Regime("lr=3e-4", lr=3e-4),
    Regime("lr=3e-3", lr=3e-3),
    Regime("every=50", every=50),
    Regime("every=250", every=250, steps=750, phases=(250, 500)),
    Regime("19M params", model="medium", batch_size=8, steps=400, warmup=100, phases=(100, 300)),
]
SLICE = Regime("tiny", model="tiny", steps=160, every=40, warmup=40, phases=(40,))


@dataclass
class Reference:
    """The uncompressed run: eval loss at every checkpoint and resume end, the train
    loss of every step, its checkpoints, and Adam's first update after each phase."""

    evals: dict[int, float] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)  # step s: loss of the step from s to s+1
    checkpoints: dict[int, dict] = field(default_factory=dict)
    next_update: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0


def reference(regime: Regime, log: Log) -> Reference:
    start = time.perf_counter()
    ref = Reference()
    trainer = Trainer(regime.config(), 0, total_steps=regime.steps, train=regime.train())
    ends = {n + HORIZON for n in regime.phases}
    ref.evals[0] = trainer.eval_loss()
    while trainer.step < regime.steps:
        step = trainer.step
        if step in regime.phases:
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        ref.losses[step] = trainer.train_steps(1)
        if step in regime.phases:
            ref.next_update[step] = {k: v - before[k] for k, v in trainer.model.state_dict().items()}
        if trainer.step % regime.every == 0:
            ref.checkpoints[trainer.step] = trainer.state_dict()
        if trainer.step % regime.every == 0 or trainer.step in ends:
            ref.evals[trainer.step] = trainer.eval_loss()
    ref.seconds = time.perf_counter() - start
    log(f"  reference: final eval loss {ref.evals[regime.steps]:.4f} ({ref.seconds:.0f} s)")
    return ref


def _pct(value: float, base: float) -> float:
    return 100.0 * (value / base - 1.0)


def closed_loop(regime: Regime, params: CodecParams | None, ref: Reference, log: Log) -> dict[str, Any]:
    """Train the regime resuming from every reconstruction (``params`` None: from the
    bf16 control's perturbed state, nothing stored)."""
    start = time.perf_counter()
    store, head = MemoryStore(), None
    raw = stored = 0
    trainer = Trainer(regime.config(), 0, total_steps=regime.steps, train=regime.train())
    deltas: dict[int, float] = {}
    while trainer.step < regime.steps:
        trainer.train_steps(regime.every)
        if params is None:
            trainer.load_state_dict(bf16_weights(trainer.state_dict()))
        else:
            result, recon = api.push(trainer.state_dict(), "run", store=store, params=params, parent=head)
            head = Head(result.commit, recon)
            raw, stored = raw + result.commit.raw_bytes, stored + result.commit.size
            trainer.load_state_dict(api.load_dict(api.restore("run", trainer.step, store=store)))
        deltas[trainer.step] = _pct(trainer.eval_loss(), ref.evals[trainer.step])
    out = {"ratio": raw / stored if stored else None, "eval_delta_pct": deltas,
           "final_delta_pct": deltas[regime.steps],
           "max_abs_delta_pct": max(abs(d) for d in deltas.values()), "seconds": time.perf_counter() - start}
    log(f"    closed loop: {_ratio(out['ratio'])}, final {out['final_delta_pct']:+.2f}%, "
        f"worst checkpoint {out['max_abs_delta_pct']:.2f}%")
    return out


def resume_once(regime: Regime, params: CodecParams | None, ref: Reference, log: Log) -> dict[str, Any]:
    """Push the reference's checkpoints as a chain; resume once from each phase
    (``params`` None: from the bf16 control's perturbed checkpoint)."""
    store, head = MemoryStore(), None
    raw = stored = 0
    out: dict[str, Any] = {"phases": {}}
    for step in sorted(ref.checkpoints):
        if step > max(regime.phases) or params is None:
            break
        result, recon = api.push(ref.checkpoints[step], "run", store=store, params=params, parent=head)
        head = Head(result.commit, recon)
        raw, stored = raw + result.commit.raw_bytes, stored + result.commit.size
    out["ratio"] = raw / stored if stored else None
    for phase in regime.phases:
        start = time.perf_counter()
        trainer = Trainer(regime.config(), 0, total_steps=regime.steps, train=regime.train())
        if params is None:
            trainer.load_state_dict(bf16_weights(ref.checkpoints[phase]))
        else:
            trainer.load_state_dict(api.load_dict(api.restore("run", phase, store=store)))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        deltas = []
        for i in range(HORIZON):
            loss = trainer.train_steps(1)
            deltas.append(_pct(loss, ref.losses[phase + i]))
            if i == 0:
                first = {k: v - before[k] for k, v in trainer.model.state_dict().items()}
        want = ref.next_update[phase]
        num = sum(float((first[k] - want[k]).float().pow(2).sum()) for k in want)
        den = sum(float(want[k].float().pow(2).sum()) for k in want)
        result = {"eval_delta_pct": _pct(trainer.eval_loss(), ref.evals[phase + HORIZON]),
                  "step_delta_pct": deltas,
                  "max_abs_step_delta_pct": max(abs(d) for d in deltas),
                  "mean_step_delta_pct": sum(deltas) / len(deltas),
                  "first_update_rel_diff": math.sqrt(num / den) if den else 0.0,
                  "seconds": time.perf_counter() - start}
        out["phases"][phase] = result
        log(f"    resume once from {phase}: after {HORIZON} steps {result['eval_delta_pct']:+.3f}%, "
            f"worst step {result['max_abs_step_delta_pct']:.2f}%, first update "
            f"{result['first_update_rel_diff']:.3f}")
    return out


def _ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.1f}x"


def run_regime(regime: Regime, presets: dict[str, CodecParams | None], log: Log) -> dict[str, Any]:
    """Reference, then both protocols for each preset (None: the bf16 control)."""
    log(f"{regime.name}: {regime}")
    ref = reference(regime, log)
    out: dict[str, Any] = {"regime": asdict(regime), "reference_final_loss": ref.evals[regime.steps],
                           "reference_seconds": ref.seconds, "presets": {}}
    for name, params in presets.items():
        log(f"  {name}")
        torch.manual_seed(0)
        out["presets"][name] = {"closed_loop": closed_loop(regime, params, ref, log),
                                "resume_once": resume_once(regime, params, ref, log)}
    return out


def meets_targets(result: dict[str, Any]) -> dict[str, bool]:
    """The default preset's targets: closed loop within ±1% at every checkpoint and
    ±0.5% at the end; resume once within ±0.2% after the horizon and ±1% at every step."""
    closed, once = result["closed_loop"], result["resume_once"]["phases"].values()
    return {"closed_every_checkpoint": closed["max_abs_delta_pct"] <= 1.0,
            "closed_final": abs(closed["final_delta_pct"]) <= 0.5,
            "once_after_horizon": all(abs(p["eval_delta_pct"]) <= 0.2 for p in once),
            "once_every_step": all(p["max_abs_step_delta_pct"] <= 1.0 for p in once)}


def table(results: list[dict[str, Any]]) -> str:
    """The grid as a markdown table: one row per regime and preset."""
    rows = ["| regime | preset | ratio (closed loop) | closed loop: final Δ | closed loop: worst checkpoint "
            "| resume once: Δ after 100 steps | resume once: worst step | first update diff |",
            "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for name, figures in result["presets"].items():
            closed, phases = figures["closed_loop"], figures["resume_once"]["phases"]
            after = ", ".join(f"{p['eval_delta_pct']:+.2f}% @{n}" for n, p in phases.items())
            worst = ", ".join(f"{p['max_abs_step_delta_pct']:.2f}% @{n}" for n, p in phases.items())
            first = ", ".join(f"{p['first_update_rel_diff']:.2f}" for p in phases.values()
                              if "first_update_rel_diff" in p) or "—"
            rows.append(f"| {result['regime']['name']} | {name} | {_ratio(closed['ratio'])} "
                        f"| {closed['final_delta_pct']:+.2f}% | {closed['max_abs_delta_pct']:.2f}% "
                        f"| {after} | {worst} | {first} |")
    return "\n".join(rows)
