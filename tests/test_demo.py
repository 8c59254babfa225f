"""`excp demo` end to end on a local store, with the tiny model and few steps."""

from __future__ import annotations

import math

import torch
from click.testing import CliRunner

from excp.cli import main


def test_demo_trains_pushes_restores_and_reports(tmp_path) -> None:
    store = tmp_path / "store"
    result = CliRunner().invoke(main, ["demo", "--store", str(store), "--config", "tiny",
                                       "--steps", "40", "--every", "20"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum("step" in line and "x)" in line for line in lines) == 2
    summary = next(line for line in lines if line.startswith("stored 2 checkpoints"))
    ratio = float(summary.split(": ")[1].split("x")[0])
    assert ratio > 5
    loss_line = next(line for line in lines if line.startswith("final eval loss"))
    losses = [float(tok) for tok in loss_line.replace("(", " ").split() if tok[0].isdigit()]
    assert all(math.isfinite(x) for x in losses)
    assert sum(line.endswith(": reference") for line in lines) == 2  # the reference run shows progress too
    assert any("docs/fidelity.md" in line for line in lines)
    restored = lines[-1].split(" to ")[-1].rsplit(" (", 1)[0]
    ckpt = torch.load(restored, weights_only=True)
    assert ckpt["step"] == 40 and "model" in ckpt and "optimizer" in ckpt
    assert "training tiny GPT for 50 steps" in lines[0]
    assert (store / "runs").is_dir()


def test_demo_rejects_every_larger_than_steps(tmp_path) -> None:
    result = CliRunner().invoke(main, ["demo", "--store", str(tmp_path), "--steps", "10", "--every", "20"])
    assert result.exit_code == 2 and "--steps must be at least --every" in result.output
