"""The resume-fidelity benchmark (excp.bench.fidelity) on its CI slice: the tiny GPT,
both protocols, the default preset against the codec it replaced."""

from __future__ import annotations

import pytest

from excp.bench import fidelity
from excp.codec.params import PRESETS


@pytest.fixture(scope="module")
def grid() -> dict:
    presets = {"default": PRESETS["default"], "uniform": PRESETS["default"].replace(weight_rule="uniform")}
    return fidelity.run_regime(fidelity.SLICE, presets, lambda line: None)


@pytest.mark.slow
def test_both_protocols_report_every_figure(grid: dict) -> None:
    regime = fidelity.SLICE
    for figures in grid["presets"].values():
        closed = figures["closed_loop"]
        assert sorted(closed["eval_delta_pct"]) == list(range(regime.every, regime.steps + 1, regime.every))
        assert closed["ratio"] > 3
        once = figures["resume_once"]["phases"]
        assert sorted(once) == list(regime.phases)
        for phase in once.values():
            assert len(phase["step_delta_pct"]) == fidelity.HORIZON
            assert phase["max_abs_step_delta_pct"] == max(abs(d) for d in phase["step_delta_pct"])
            assert 0 < phase["first_update_rel_diff"] < 10
    assert "| tiny | default |" in fidelity.table([grid])


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
