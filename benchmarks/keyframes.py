"""Ratio against restore time as the keyframe interval changes.

Trains the workload's GPT once (open loop), keeps every ``--every``-th checkpoint in
memory, then pushes the same chain with several ``keyframe_every`` values and reports,
for each: the chain's total ratio (keyframes included) and the time to restore the
last checkpoint (the longest walk).

    python benchmarks/keyframes.py --config small --steps 2000 --every 100 --intervals 0 5 10 20
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from excp import api
from excp.chain import Head
from excp.codec.params import PRESETS
from excp.store import MemoryStore
from excp.workload import run_chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--intervals", type=int, nargs="+", default=[0, 5, 10, 20])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    checkpoints: list[dict] = []
    run_chain(args.config, args.steps, args.every, 0,
              lambda step, state: checkpoints.append(copy.deepcopy(state)))
    rows = []
    for interval in args.intervals:
        store = MemoryStore()
        params = PRESETS[args.preset].replace(keyframe_every=interval)
        head = None
        for ckpt in checkpoints:
            result, recon = api.push(ckpt, "k", store=store, params=params, parent=head)
            head = Head(result.commit, recon)
        commits = api.list_commits("k", store)
        start = time.perf_counter()
        api.restore("k", "latest", store=store)
        restore_s = time.perf_counter() - start
        raw, stored = sum(c.raw_bytes for c in commits), sum(c.size for c in commits)
        rows.append({"keyframe_every": interval, "checkpoints": len(commits),
                     "keyframes": sum(c.keyframe for c in commits), "ratio": raw / stored,
                     "walk": commits[-1].depth + 1, "restore_last_s": restore_s})
        r = rows[-1]
        print(f"keyframe_every {interval:>3}: {r['keyframes']:>2} keyframes in {r['checkpoints']} "
              f"checkpoints, ratio {r['ratio']:5.1f}x, restore of the last decodes {r['walk']:>2} "
              f"archives in {restore_s:.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
