"""Crash consistency: SIGKILL a pusher at a random point of a push, many times, and
check after each kill that nothing was lost or half-committed (what the CI tests
do once per kind, here a hundred times at random points).

Each round starts a pusher on one directory store — alternately ``excp push`` (the
CLI) and a training loop with the ``Checkpointer`` hook — kills it after a random
delay, then checks: ``excp verify`` passes, every committed step restores bit-equal to
what was restored of it after the round it was committed in (nothing committed ever
changes), no commit names a missing archive, and ``excp gc`` removes only unreferenced
archives and leaves a chain that still verifies. Prints the counts as JSON.

    python benchmarks/crash.py --rounds 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from excp import api
from excp.chain import Chain
from excp.errors import NotFound
from excp.store import open_store

ROOT = Path(__file__).resolve().parent.parent
HOOK_JOB = """
import sys, time, torch
sys.path.insert(0, {root!r})
from tests.conftest import TinyRun
from excp.client import Checkpointer
tiny = TinyRun(seed={seed})
ckpt = Checkpointer("hook", {store!r}, every=10)
start = ckpt.restore(tiny.model, tiny.opt)
tiny.step = start["step"] if start else 0
for _ in range(1000):
    time.sleep(0.02)  # the rest of a training step
    tiny.advance(1)
    ckpt.step(tiny.step, tiny.model, tiny.opt)
ckpt.close()
"""


def _cli_job(store: str, work: Path, step: int, seed: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import TinyRun

    path = work / f"ckpt-{step}.pt"
    checkpoint = TinyRun(seed=seed).advance(3 + step % 7)
    checkpoint["step"] = step
    torch.save(checkpoint, path)
    return [sys.executable, "-c", "from excp.cli import main; main()", "push", str(path), "--run", "cli",
            "--store", store]


def _check(store: str, run: str, seen: dict[tuple[str, int], str]) -> int:
    """Verify the run and compare every step (all decoded in one pass over the chain)
    with what it restored to the first time; returns the steps checked."""
    try:
        chain = Chain(open_store(store), run)
        chain.config()
    except NotFound:
        return 0
    api.verify(run, store=store)
    checked = 0
    for commit, bundle in chain.replay():
        digest = bundle.digest()
        if seen.setdefault((run, commit.step), digest) != digest:
            raise SystemExit(f"{run} step {commit.step} restores differently after a crash")
        checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: dict[tuple[str, int], str] = {}
    counts = {"rounds": 0, "killed": 0, "finished_before_kill": 0, "gc_deleted": 0}
    with tempfile.TemporaryDirectory() as tmp:
        work, store = Path(tmp), str(Path(tmp) / "store")
        env = {**os.environ, "EXCP_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        for round_ in range(args.rounds):
            if round_ % 2 == 0:
                command = _cli_job(store, work, 10 * (round_ + 1), round_)
            else:
                command = [sys.executable, "-c", HOOK_JOB.format(root=str(ROOT), seed=round_, store=store)]
            job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # python + torch start in about a second, then the CLI pushes once (1.7 s in
            # all, idle) and the hook pushes every 10 steps until it is killed
            time.sleep(rng.uniform(1.0, 3.5) if round_ % 2 == 0 else rng.uniform(1.5, 5.0))
            if job.poll() is None:
                os.kill(job.pid, signal.SIGKILL)
                counts["killed"] += 1
            else:
                counts["finished_before_kill"] += 1
            job.wait()
            counts["rounds"] += 1
            for run in ("cli", "hook"):
                _check(store, run, seen)
            counts["gc_deleted"] += len(api.gc(store=store).keys)
            for run in ("cli", "hook"):
                _check(store, run, seen)
        counts["steps_committed"] = len(seen)
        counts["seconds"] = round(time.perf_counter() - start)
    counts["data_lost"] = 0  # _check stops the campaign at the first change; verify raises on a failure
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
