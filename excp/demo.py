"""``excp demo``: the whole product in two minutes on a laptop CPU.

Trains the workload's GPT, pushes a compressed checkpoint to the store every
``every`` steps up to ``steps`` (keeping the reconstruction in memory, as the
training-loop hook does), resumes training from each *reconstructed* checkpoint —
including half an interval past the last one, so the final loss shows training going
on from a restored checkpoint — restores one checkpoint to a file the way a user
would, and compares the final eval loss with an identical run that never went
through excp.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from excp import api
from excp.chain import Commit, Head
from excp.codec.params import CodecParams
from excp.store import Store
from excp.workload import run_chain


@dataclass
class DemoResult:
    run: str
    commits: list[Commit]
    restored_path: Path
    loss_uncompressed: float
    loss_excp: float

    @property
    def ratio(self) -> float:
        return sum(c.raw_bytes for c in self.commits) / sum(c.size for c in self.commits)

    @property
    def loss_delta(self) -> float:
        """Relative difference of the final eval loss, compressed vs uncompressed."""
        return self.loss_excp / self.loss_uncompressed - 1


def run_demo(store: Store, *, config: str = "small", steps: int = 300, every: int = 100,
             seed: int = 0, params: CodecParams | None = None, out_dir: Path | None = None,
             report: Callable[[str], None] = print) -> DemoResult:
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    commits: list[Commit] = []
    head: dict[str, Head | None] = {"last": None}

    def on_checkpoint(step: int, state: dict) -> dict:
        result, recon = api.push(state, run, store=store, params=params, parent=head["last"])
        c = result.commit
        head["last"] = Head(c, recon)
        commits.append(c)
        report(f"  step {step:>5}: {'keyframe' if c.keyframe else 'link    '} "
               f"{c.raw_bytes / 1e6:7.2f} MB -> {c.size / 1e6:6.3f} MB  ({c.ratio:5.1f}x)")
        return api.load_dict(api.restore(run, step, store=store))

    total = steps + every // 2
    report(f"training {config} GPT for {total} steps, pushing to {store.url} run {run!r} "
           f"every {every} steps and resuming from each reconstruction")
    with torch.random.fork_rng():
        compressed = run_chain(config, total, every, seed, on_checkpoint)
    report("training the same run without excp, for reference")

    def on_reference(step: int, state: dict) -> None:
        report(f"  step {step:>5}: reference")

    with torch.random.fork_rng():
        reference = run_chain(config, total, every, seed, on_reference)
    out = Path(out_dir or tempfile.mkdtemp(prefix="excp-demo-"))
    restored = api.restore(run, commits[-1].step, out / f"step-{commits[-1].step}.pt", store=store)
    path = out / f"step-{restored.step}.pt"
    return DemoResult(run, commits, path, reference.final_loss, compressed.final_loss)
