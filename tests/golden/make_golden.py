"""Build the golden archives under ``tests/golden/v1/`` (run from the repo root).

    python tests/golden/make_golden.py [CASE ...]

Each case trains a tiny model a few AdamW steps from a fixed seed, pushes three
checkpoints (a keyframe and two links) as one chain into a fresh local store with
``excp.api.push``, and copies for every step:

* the archive, as ``v1/<case>/<step>.excp``;
* what ``excp.api.restore`` gave back at generation time, as
  ``v1/<case>/<step>.expected.safetensors``: every tensor of the restored bundle under
  its bundle entry name; the metadata key ``excp_golden`` holds JSON with the
  bundle's layout, step and a blake2b-128 digest of each extra.

``tests/test_golden.py`` decodes the committed archives with today's decoder and
requires bit-identical tensors, so a change of decoder behaviour (or of the format)
fails there. Regenerate only for a deliberate format change, and then as a new
``v<N>`` folder: the old folder is what proves old archives still decode. A case
added to the format (a new unit variant) is built alone: ``make_golden.py CASE``.
The script is deterministic on one machine: same torch build, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parents[1]
OUT = ROOT / "v1"
RUN = "golden"
STEPS_PER_CHECKPOINT = 4
CHECKPOINTS = 3


def _model(seed: int, dtype: torch.dtype, norm: str = "layer") -> torch.nn.Module:
    torch.manual_seed(seed)
    norm_layer = torch.nn.LayerNorm(24) if norm == "layer" else torch.nn.BatchNorm1d(24)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), norm_layer,
                               torch.nn.Linear(24, 6)).to(dtype)


def _data(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 12, generator=gen)
    y = torch.tanh(x @ torch.randn(12, 6, generator=gen))
    return x.to(dtype), y.to(dtype)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor,
           y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        if opt is None:  # weights-only: plain SGD, so there is no optimizer state to keep
            model.zero_grad()
            ((model(x) - y) ** 2).float().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        else:
            opt.zero_grad()
            ((model(x) - y) ** 2).float().mean().backward()
            opt.step()


def _adam_run(dtype: torch.dtype, amsgrad: bool = False) -> Iterator[tuple[int, dict]]:
    model = _model(0, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=amsgrad)
    x, y = _data(0, dtype)
    for i in range(1, CHECKPOINTS + 1):
        _train(model, opt, x, y, STEPS_PER_CHECKPOINT)
        step = i * STEPS_PER_CHECKPOINT
        yield step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "meta": {"case": "golden", "lr": 3e-3}}


def _weights_only_run() -> Iterator[tuple[int, dict]]:
    model = _model(1, torch.float32, norm="batch")  # num_batches_tracked: an int64 'other'
    x, y = _data(1, torch.float32)
    for i in range(1, CHECKPOINTS + 1):
        _train(model, None, x, y, STEPS_PER_CHECKPOINT)
        yield i * STEPS_PER_CHECKPOINT, dict(model.state_dict())


PAPER = {"weight_rule": "paper"}  # the k-means rule (the default before "uniform", then "adam")
CASES: dict[str, tuple[Callable[[], Iterator[tuple[int, dict]]], dict]] = {
    "fp32": (lambda: _adam_run(torch.float32), PAPER),
    "bf16": (lambda: _adam_run(torch.bfloat16), PAPER),
    "amsgrad": (lambda: _adam_run(torch.float32, amsgrad=True), PAPER),
    "weights_only": (_weights_only_run, PAPER),
    "lossless": (lambda: _adam_run(torch.float32), {"mode": "lossless"}),
    "uniform": (lambda: _adam_run(torch.float32), {"weight_rule": "uniform"}),
    "uniform_bf16": (lambda: _adam_run(torch.bfloat16), {"weight_rule": "uniform"}),
    "adam": (lambda: _adam_run(torch.float32), {"weight_rule": "adam"}),
    "adam_bf16": (lambda: _adam_run(torch.bfloat16), {"weight_rule": "adam"}),
    "adam_amsgrad": (lambda: _adam_run(torch.float32, amsgrad=True), {"weight_rule": "adam"}),
    "adam_weights_only": (_weights_only_run, {"weight_rule": "adam"}),
}


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def build_case(name: str, store_dir: Path) -> None:
    from excp import api
    from excp.codec.params import CodecParams

    run, options = CASES[name]
    target = OUT / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    store = str(store_dir / name)
    for i, (step, checkpoint) in enumerate(run()):
        params = CodecParams(**options) if i == 0 else None
        if "model" not in checkpoint:  # a bare state dict goes in as a file, as users push it
            path = store_dir / f"{name}-{step}.pt"
            torch.save(checkpoint, path)
            checkpoint = path
        result, _ = api.push(checkpoint, RUN, step=step, store=store, params=params)
        commit = result.commit
        assert result.created and commit.keyframe == (i == 0) and commit.depth == i, commit
        shutil.copyfile(Path(store) / commit.archive, target / f"{step}.excp")
        bundle = api.restore(RUN, step, store=store)
        tensors = {e.name: e.tensor.contiguous() for e in bundle.tensors.values()}
        about = {"layout": bundle.layout, "step": bundle.step,
                 "extras": {k: _digest(v) for k, v in bundle.extras.items()}}
        # one metadata key: safetensors writes several in a random order
        metadata = {"excp_golden": json.dumps(about, sort_keys=True)}
        save_file(tensors, str(target / f"{step}.expected.safetensors"), metadata=metadata)


def main() -> None:
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EXCP_CACHE"] = str(Path(tmp) / "cache")  # never the user's cache
        names = sys.argv[1:] or list(CASES)
        for name in names:
            build_case(name, Path(tmp) / "stores")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {', '.join(names)} to {OUT} ({total / 1000:.1f} KB in all)")


if __name__ == "__main__":
    main()
