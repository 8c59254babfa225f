"""What exact copies (``keep_exact``) cost: their size, the push time they add, a run's storage.

Trains the workload's GPT once, keeps every ``--every``-th checkpoint in memory, and
reports:

* bytes per parameter of one checkpoint (the last) as an exact copy against its link,
  as excp lossless alone (no parent) and as a lossless link against the previous
  checkpoint, and as ZipNN (per float tensor, its defaults); the lossy link beside them;
* the median push time of the whole run pushed the way the hook pushes it (each push
  handed the previous reconstruction), with ``keep_exact`` 0 and 1;
* the total storage of the run with ``keep_exact=1`` against three ``torch.save`` files
  of its checkpoints (what keeping the last three checkpoints takes).

    python benchmarks/exact.py --config tiny --steps 500 --every 10
    python benchmarks/exact.py --hf --steps 60 --every 20     # Hugging Face Trainer checkpoints

``--hf`` fine-tunes all-MiniLM-L6-v2 with the Trainer (the fidelity benchmark's job; needs
the bench extra) and measures its checkpoint directories instead; their ``torch.save``
size is the directory's bytes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from excp import api
from excp.bench.contenders import ZipNN
from excp.chain import Head
from excp.codec.params import PRESETS
from excp.exact import ExactCopies
from excp.store import MemoryStore
from excp.workload import run_chain


def _push_runs(checkpoints: list[dict], keeps: tuple[int, ...]) -> list[tuple[MemoryStore, list[float]]]:
    """The run pushed as the hook pushes it, once per ``keep_exact`` value, each
    checkpoint to every run in turn (so load on the machine hits all of them alike);
    each run's store and the seconds each of its pushes took."""
    runs = [(MemoryStore(), []) for _ in keeps]
    heads: list[Head | None] = [None for _ in keeps]
    for ckpt in checkpoints:
        for i, keep in enumerate(keeps):
            start = time.perf_counter()
            result, recon = api.push(ckpt, "run", store=runs[i][0], parent=heads[i], keep_exact=keep)
            runs[i][1].append(time.perf_counter() - start)
            heads[i] = Head(result.commit, recon)
    return runs


def _lossless_sizes(previous: dict, last: dict) -> tuple[int, int]:
    """Bytes of ``last`` in excp lossless mode: alone, and as a link after ``previous``."""
    alone, _ = api.push(last, "alone", store=MemoryStore(), params=PRESETS["lossless"])
    store = MemoryStore()
    api.push(previous, "link", store=store, params=PRESETS["lossless"])
    link, _ = api.push(last, "link", store=store)
    return alone.commit.size, link.commit.size


def _torch_save_size(ckpt: dict | Path) -> int:
    if isinstance(ckpt, Path):
        return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.tell()


def _hf_checkpoints(root: Path, steps: int, every: int) -> list[Path]:
    """Trainer checkpoint directories of the fidelity benchmark's MiniLM fine-tune."""
    from excp.bench.fidelity_hf import FineTune, HFRegime

    regime = dataclasses.replace(HFRegime(), steps=steps, every=every)
    FineTune(regime, root).trainer(root / "out", steps, {}).train()
    return [root / "out" / f"checkpoint-{step}" for step in range(every, steps + 1, every)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--hf", action="store_true", help="Hugging Face Trainer checkpoints (MiniLM).")
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints: list = []
        if args.hf:
            checkpoints = _hf_checkpoints(Path(tmp), args.steps, args.every)
            args.config = "all-MiniLM-L6-v2 (HF Trainer)"
        else:
            run_chain(args.config, args.steps, args.every, 0,
                      lambda step, state: checkpoints.append(copy.deepcopy(state)))
        _measure(args, checkpoints)


def _measure(args: argparse.Namespace, checkpoints: list) -> None:
    last = checkpoints[-1]
    parameters = api.to_bundle(last).num_parameters()

    (plain, plain_s), (exact, exact_s) = _push_runs(checkpoints, (0, 1))
    links = api.list_commits("run", exact)
    (record,) = ExactCopies(exact, "run").records()
    alone, lossless_link = _lossless_sizes(checkpoints[-2], last)
    zipnn = ZipNN()
    zipnn_size = None if zipnn.unavailable() else zipnn.pack(api.to_bundle(last))[1]
    saved = _torch_save_size(last)
    stored = sum(c.size for c in links) + record.size
    figures = {
        "config": args.config, "checkpoints": len(checkpoints), "parameters": parameters,
        "bytes_per_parameter": {
            "exact copy": record.size / parameters, "excp lossless": alone / parameters,
            "excp lossless link": lossless_link / parameters,
            "zipnn": None if zipnn_size is None else zipnn_size / parameters,
            "lossy link": links[-1].size / parameters, "torch.save": saved / parameters},
        "push_s": {"keep_exact=0": statistics.median(plain_s), "keep_exact=1": statistics.median(exact_s)},
        "storage_bytes": {"links": sum(c.size for c in links), "links + 1 exact copy": stored,
                          "3 torch.save files": 3 * saved},
    }
    assert [c.digest for c in api.list_commits("run", plain)] == [c.digest for c in links]
    print(f"{args.config}: {len(checkpoints)} checkpoints, {parameters:,} parameters "
          f"(weights; each also has its two AdamW moments)")
    for name, value in figures["bytes_per_parameter"].items():
        print(f"  {name:<20} {'n/a' if value is None else f'{value:.3f}'} bytes/parameter")
    for name, value in figures["push_s"].items():
        print(f"  push, {name:<13} {1000 * value:.0f} ms median")
    for name, value in figures["storage_bytes"].items():
        print(f"  storage, {name:<21} {value / 1e6:.2f} MB")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    main()
