"""The ``adam`` unit codec: every error within its budget in Adam's units, v never
restored as zero where it was not, and the decoder giving exactly what the encoder
committed to (the closed loop)."""

from __future__ import annotations

import math

import pytest
import torch

from excp import api
from excp.bundle import Role
from excp.codec import adam, pack
from excp.codec.params import PRESETS, CodecParams
from excp.codec.types import Encoded
from excp.errors import CorruptData
from tests.conftest import TinyRun

DEFAULT = PRESETS["default"]
ALL = {Role.WEIGHT: torch.float32, Role.EXP_AVG: torch.float32, Role.EXP_AVG_SQ: torch.float32}


def _state(shape: tuple[int, ...], seed: int = 0, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """A weight that moved by a few Adam steps, and moments shaped like real ones: v a
    rank-1 trend times a log-normal spread, some positions never touched (v = m = 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and n else 1
    trend = torch.rand(rows, 1, generator=gen) * torch.rand(1, n // rows, generator=gen) + 0.05
    v = (trend * torch.exp(2 * torch.randn(rows, n // rows, generator=gen)) * 1e-6).reshape(shape)
    m = torch.randn(shape, generator=gen) * v.sqrt() * 0.3
    if n > 4:
        v.view(-1)[:3] = 0
        m.view(-1)[:3] = 0
    parent = torch.randn(shape, generator=gen) * 0.02
    weight = parent + torch.randn(shape, generator=gen) * 5 * lr
    return {"w": weight, "parent": parent, "m": m, "v": v}


def _code(s: dict, params: CodecParams = DEFAULT, keyframe: bool = False, lr: float | None = 1e-3,
          ) -> tuple[Encoded, torch.Tensor, dict[Role, torch.Tensor]]:
    parent = None if keyframe else s["parent"]
    enc, recon = adam.encode_unit(s["w"], parent, {Role.EXP_AVG: s["m"], Role.EXP_AVG_SQ: s["v"]}, params,
                                  keyframe, lr)
    shape = tuple(s["w"].shape)
    adam.check_streams(enc, shape, set(ALL), "unit")
    out = adam.decode_unit(enc, parent, ALL, shape, torch.device("cpu"))
    return enc, recon, out


@pytest.mark.parametrize("shape", [(96, 80), (300,), (8, 4, 3, 3), (1, 50), (5,), (0, 4)])
@pytest.mark.parametrize("keyframe", [False, True])
def test_the_decoder_gives_what_the_encoder_committed_to(shape: tuple[int, ...], keyframe: bool) -> None:
    s = _state(shape)
    _, recon, out = _code(s, keyframe=keyframe)
    assert out[Role.WEIGHT].shape == shape and torch.equal(out[Role.WEIGHT], recon)


def test_v_is_within_its_factor_and_never_zero_where_it_was_not() -> None:
    s = _state((128, 96))
    _, _, out = _code(s)
    v, got = s["v"], out[Role.EXP_AVG_SQ]
    live = v > 0
    ratio = got[live] / v[live]
    bound = 2 ** (DEFAULT.v_step / 2)
    assert float(ratio.min()) >= 1 / bound * (1 - 1e-6) and float(ratio.max()) <= bound * (1 + 1e-6)
    assert bool((got[~live] == 0).all())
    assert not bool(((out[Role.EXP_AVG] != 0) & (got == 0)).any())


def test_v_ratio_levels_follow_v_step() -> None:
    """A finer v_step gives a tighter factor (and more levels)."""
    s = _state((64, 64), seed=3)
    fine = _code(s, DEFAULT.replace(v_step=1))
    coarse = _code(s, DEFAULT.replace(v_step=3))
    live = s["v"] > 0

    def spread(result: tuple) -> float:
        return float((result[2][Role.EXP_AVG_SQ][live] / s["v"][live]).log2().abs().max())

    assert spread(fine) <= 0.5 + 1e-5 < spread(coarse) <= 1.5 + 1e-5
    assert fine[0].meta["vlevels"] > coarse[0].meta["vlevels"]


def test_m_is_coded_as_the_direction_of_adams_step() -> None:
    s = _state((64, 48), seed=1)
    enc, _, out = _code(s)
    root = out[Role.EXP_AVG_SQ].sqrt()
    live = root > 0
    error = (out[Role.EXP_AVG][live] - s["m"][live]) / root[live]
    assert float(error.abs().max()) <= DEFAULT.m_step / 2 * (1 + 1e-5)  # within half a level
    assert bool((out[Role.EXP_AVG][~live] == 0).all())
    clear = live & ((s["m"] / root).abs() >= DEFAULT.m_step)  # beyond the zero level: never pruned
    assert bool(clear.any()) and bool((out[Role.EXP_AVG][clear] != 0).all())


def test_weight_error_is_within_half_a_step_of_lr_step_times_lr() -> None:
    """Per position the step is q·2^-s: s > 0 (finer) where v is large, down to
    q·2^COARSER where v is small; the error never exceeds half the position's step."""
    lr = 1e-3
    s = _state((128, 128), seed=2, lr=lr)
    enc, recon, out = _code(s, lr=lr)
    q = enc.meta["q"]
    assert q == pytest.approx(DEFAULT.lr_step * lr)
    error = (recon - s["w"]).abs()
    assert float(error.max()) <= 0.5 * q * 2**adam.COARSER * (1 + 1e-5)
    v = out[Role.EXP_AVG_SQ]
    large, small = v > v[v > 0].quantile(0.9), (v > 0) & (v < v[v > 0].quantile(0.1))
    assert float(error[large].max()) < float(error[small].max())
    assert float(error[large].max()) <= 0.5 * q * (1 + 1e-5)


def test_without_a_learning_rate_the_step_follows_the_residual() -> None:
    s = _state((64, 64))
    link, _, _ = _code(s, lr=None)
    delta = s["w"] - s["parent"]
    assert link.meta["q"] == pytest.approx(DEFAULT.weight_step * float(delta.pow(2).mean().sqrt()), rel=0.05)
    key, _, _ = _code(s, keyframe=True, lr=None)
    rms = float(s["w"].pow(2).mean().sqrt())
    assert key.meta["q"] == pytest.approx(DEFAULT.keyframe_step * rms, rel=0.05)


def test_a_keyframe_at_a_small_learning_rate_uses_wide_codes_and_keeps_its_budget() -> None:
    """Pretrained weights at lr 5e-5: W/q reaches thousands of levels; nothing is
    widened or clipped, so the keyframe's error stays within half a step."""
    s = _state((64, 64), seed=5, lr=5e-5)
    s["w"] = s["w"] * 25  # weights ~0.5, as a pretrained model's can be
    enc, recon, out = _code(s, keyframe=True, lr=5e-5)
    assert enc.meta["wide"] == 2
    assert float((recon - s["w"]).abs().max()) <= 0.5 * enc.meta["q"] * 2**adam.COARSER * (1 + 1e-5)
    assert torch.equal(out[Role.WEIGHT], recon)


def test_a_position_that_never_had_a_gradient_keeps_its_parent_bit_for_bit() -> None:
    """Where v is 0 (no gradient ever: an embedding row of a token never seen) an
    unmoved weight is rounded without dither: it stays exactly as it was, level 0."""
    s = _state((64, 64), seed=6)
    untouched = torch.zeros(64, 64, dtype=torch.bool)
    untouched[:16] = True
    s["v"][untouched], s["m"][untouched] = 0.0, 0.0
    s["w"][untouched] = s["parent"][untouched]
    enc, recon, _ = _code(s)
    assert torch.equal(recon[untouched], s["parent"][untouched])
    moved = (recon - s["parent"])[~untouched]
    assert bool((moved != 0).any())


def test_dither_keeps_the_coherent_part_of_a_move_far_below_one_level() -> None:
    """A drift of a tenth of a level, shared by every position (the direction of
    training progress), survives the coding on average; rounding without dither would
    send every position to level 0 and lose it."""
    s = _state((256, 256), seed=8)
    drift = 0.1 * DEFAULT.lr_step * 1e-3
    s["w"] = s["parent"] + drift
    enc, recon, _ = _code(s)
    assert float((recon - s["parent"]).mean()) == pytest.approx(drift, rel=0.1)


def test_numpy_and_torch_formulations_give_the_same_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _state((96, 64), seed=7)
    first, recon, _ = _code(s)
    monkeypatch.setattr(pack, "numpy_path", lambda _: False)
    second, again, _ = _code(s)
    assert first.meta == second.meta and torch.equal(recon, again)
    assert {k: bytes(v.numpy()) for k, v in first.streams.items()} == \
        {k: bytes(v.numpy()) for k, v in second.streams.items()}


@pytest.mark.parametrize("damage", ["short vcodes", "short vrow", "bad vlevels", "bad q", "bad mlevels",
                                    "bad wlevels", "bad wide", "no vref", "no dither", "bad mstep"])
def test_inconsistent_units_are_corrupt_data(damage: str) -> None:
    s = _state((32, 16))
    enc, _, _ = _code(s)
    streams, meta = enc.streams, enc.meta
    if damage == "short vcodes":
        streams["vcodes"] = streams["vcodes"][:-1]
    elif damage == "short vrow":
        streams["vrow"] = streams["vrow"][:-4]
    elif damage == "bad vlevels":
        meta["vlevels"] = 500
    elif damage == "bad q":
        meta["q"] = float("nan")
    elif damage == "bad mlevels":
        meta["mlevels"] = 300
    elif damage == "bad wlevels":
        meta["wlevels"] = 300
    elif damage == "no dither":
        del meta["dither"]
    elif damage == "bad mstep":
        meta["mstep"] = 0.0
    elif damage == "bad wide":
        meta["wide"] = 3
    elif damage == "no vref":
        del meta["vref"]
    with pytest.raises(CorruptData, match="unit"):
        adam.check_streams(enc, (32, 16), set(ALL), "unit")


def test_the_learning_rate_comes_from_each_weights_param_group() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[1].parameters(), "lr": torch.tensor(2e-4)}])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    bundle = api.to_bundle({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert bundle.lr == pytest.approx({"0.weight": 1e-3, "0.bias": 1e-3, "1.weight": 2e-4, "1.bias": 2e-4})


def test_a_chain_of_a_real_run_restores_every_moment_without_zeros() -> None:
    """End to end: AdamW's state after training comes back with v > 0 wherever the
    original's was, so the resumed optimizer steps at its own scale."""
    run = TinyRun(seed=1)
    store = "memory://adam-chain"
    for _ in range(3):
        ckpt = run.advance(5)
        api.push(ckpt, "run", store=store)
    restored = api.load_dict(api.restore("run", "latest", store=store))
    for index, state in ckpt["optimizer"]["state"].items():
        got = restored["optimizer"]["state"][index]["exp_avg_sq"]
        assert bool((got[state["exp_avg_sq"] > 0] > 0).all())
