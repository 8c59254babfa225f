"""What the training-loop hook costs a training job: stall per save, waits, slowdown.

Trains an MLP with AdamW (``--params`` weights, float32, random regression data) for
``--steps`` steps three times — without the hook, with ``Checkpointer`` saving every
``--every`` steps to a directory store, and to ``excp serve`` on 127.0.0.1 (started
here, on a temporary directory store) — and prints per run: the loop's wall time,
the stall per save (the snapshot copy the loop waits for), the time spent waiting for
the previous save, the background coding+upload time per save, the ratio, and the
process's peak RSS growth over the run without the hook.

    python benchmarks/hook.py --params 25e6 --steps 60 --every 10

On a CPU-only machine the background thread competes with training for the same
cores, so the slowdown is an upper bound of what a GPU job sees (where the loop runs
on the GPU and the hook's host work overlaps it).
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
import torch

from excp.client import Checkpointer
from excp.memory import tune_allocator

WARMUP = 3


def build(params: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(seed)
    width = 1024
    layers = max(1, round(params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, torch.randn(32, width)


def train(args: argparse.Namespace, target: str | None) -> dict:
    model, optimizer, data = build(args.params)
    for _ in range(WARMUP):  # first steps allocate the moments and fault pages in: not timed
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    rss0 = psutil.Process().memory_info().rss
    peak = rss0
    ckpt = Checkpointer("bench-hook", target, every=args.every) if target else None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
        if ckpt is not None:
            ckpt.step(step, model, optimizer)
        peak = max(peak, psutil.Process().memory_info().rss)
    loop = time.perf_counter() - start
    row = {"target": target or "no hook", "loop_s": round(loop, 2),
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "peak_rss_growth_MB": round((peak - rss0) / 1e6)}
    if ckpt is not None:
        ckpt.close()
        stats = ckpt.stats
        peak = max(peak, psutil.Process().memory_info().rss)
        row.update(total_s=round(time.perf_counter() - start, 2), saves=stats.saves,
                   stall_per_save_ms=round(1000 * stats.snapshot_s / stats.saves, 1),
                   waited_s=round(stats.waited_s, 2), push_per_save_s=round(stats.push_s / stats.saves, 2),
                   ratio=round(stats.ratio, 1), peak_rss_growth_MB=round((peak - rss0) / 1e6))
    return row


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    command = [sys.executable, "-c", "from excp.cli import main; main()", "serve",
               "--store", str(root / "served"), "--port", str(port), "--cache-dir", str(root / "cache")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc, f"excp://127.0.0.1:{port}"
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("excp serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    tune_allocator()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EXCP_CACHE"] = str(root / "excp-cache")
        rows.append(train(args, None))
        rows.append(train(args, str(root / "store")))
        proc, url = serve(root)
        try:
            rows.append(train(args, url))
        finally:
            proc.terminate()
            proc.wait(30)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
