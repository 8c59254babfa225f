"""The resume-fidelity benchmark (excp.bench.fidelity) on its CI slice: the tiny GPT,
both protocols, the default preset against the codec it replaced."""

from __future__ import annotations

import pytest
import torch

from excp.bench import fidelity
from excp.codec.params import PRESETS


@pytest.fixture(scope="module")
def grid() -> dict:
    presets = {"default": PRESETS["default"], "uniform": PRESETS["default"].replace(weight_rule="uniform"),
               fidelity.CONTROL: None}
    return fidelity.run_regime(fidelity.SLICE, presets, lambda line: None)


@pytest.mark.slow
def test_both_protocols_report_every_figure(grid: dict) -> None:
    regime = fidelity.SLICE
    for name, figures in grid["presets"].items():
        closed = figures["closed_loop"]
        assert sorted(closed["eval_delta_pct"]) == list(range(regime.every, regime.steps + 1, regime.every))
        assert closed["ratio"] is None if name == fidelity.CONTROL else closed["ratio"] > 3
        once = figures["resume_once"]["phases"]
        assert sorted(once) == list(regime.phases)
        for phase in once.values():
            assert len(phase["step_delta_pct"]) == fidelity.HORIZON
            assert phase["max_abs_step_delta_pct"] == max(abs(d) for d in phase["step_delta_pct"])
            assert 0 < phase["first_update_rel_diff"] < 10
    assert "| tiny | default |" in fidelity.table([grid])
    assert f"| tiny | {fidelity.CONTROL} | — |" in fidelity.table([grid])


@pytest.mark.slow
def test_the_default_resumes_closer_to_the_original_than_the_codec_it_replaced(grid: dict) -> None:
    """Training resumed from the default preset's reconstruction follows the original
    run more closely, in both protocols, than it does under the pruning codec whose
    zeroed moments and deadzone rounding it replaced."""
    new, old = grid["presets"]["default"], grid["presets"]["uniform"]
    assert new["closed_loop"]["max_abs_delta_pct"] < old["closed_loop"]["max_abs_delta_pct"]
    for phase in fidelity.SLICE.phases:
        got, was = new["resume_once"]["phases"][phase], old["resume_once"]["phases"][phase]
        assert got["max_abs_step_delta_pct"] < was["max_abs_step_delta_pct"]
        assert got["first_update_rel_diff"] < was["first_update_rel_diff"]


def test_the_bf16_control_rounds_weights_only_and_leaves_the_checkpoint_alone() -> None:
    from excp.workload.train import Trainer

    trainer = Trainer("tiny", 0, total_steps=4)
    trainer.train_steps(2)
    state = trainer.state_dict()
    before = trainer.state_dict()
    control = fidelity.bf16_weights(state)
    for name, weight in state["model"].items():
        assert torch.equal(weight, before["model"][name])  # the input is not touched
        rounded = control["model"][name]
        assert rounded.dtype == weight.dtype
        assert torch.all((rounded - weight).abs() <= weight.abs() * 2.0**-8)
    assert any(not torch.equal(control["model"][n], w) for n, w in state["model"].items())
    moments = [(s["exp_avg"], control["optimizer"]["state"][k]["exp_avg"])
               for k, s in state["optimizer"]["state"].items()]
    assert all(torch.equal(a, b) and a is not b for a, b in moments)
