"""Codec parameters and named presets.

The parameters in force are written into every archive (``CodecParams.to_dict``) and
read back from it, so an archive always decodes with the parameters that made it,
whatever the defaults are when it is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from excp.errors import InvalidInput

MODES = ("excp", "lossless")
WEIGHT_RULES = ("adam", "uniform", "paper", "keep")


@dataclass(frozen=True)
class CodecParams:
    """Everything that decides how a checkpoint is coded.

    * ``mode``: ``excp`` (lossy) or ``lossless`` (bit-exact).
    * ``weight_rule``: how a weight and its Adam state are coded.
      ``adam`` (default, :mod:`excp.codec.adam`): errors budgeted in Adam's own units —
      ΔW = W − Ŵ_parent in steps of ``lr_step``·lr (finer where v is large); v at every
      position, within a factor 2^(``v_step``/2), from a rank-1 prediction; m as
      m/√v̂ in steps of ``m_step``. Without a learning rate (weights-only input) the
      weight step is ``weight_step``·RMS(ΔW) (``keyframe_step``·RMS(W) for keyframes).
      ``uniform`` rounds ΔW to multiples of ``weight_step``·RMS(ΔW) (keyframes
      ``keyframe_step``·RMS(W)) and keeps moments only where the paper's joint rule
      does. ``paper`` (ExCP) sends ΔW where |ΔW| > f·median(|ΔW|) with
      f = min(2.5, alpha / sqrt(mean(v))), as 2^``weight_bits`` k-means levels
      (2^``keyframe_bits`` for keyframes); ``keep`` sends the ``weight_keep`` largest
      fraction of |ΔW| the same way (the substitute for ``paper`` whenever a weight has
      no second moment).
    * moments under ``uniform``/``paper``/``keep``: m and v are kept where
      |m| > beta·mean(|m|), ΔW was sent and v > 0, as 2^``moment_bits`` k-means
      levels, and are zero elsewhere.
    * ``keyframe_every``: a standalone keyframe every K links (0: only the first).
    """

    mode: str = "excp"
    weight_rule: str = "adam"
    lr_step: float = 8.0
    v_step: int = 2
    m_step: float = 0.5
    alpha: float = 5e-5
    beta: float = 3.0
    weight_keep: float = 0.75
    weight_step: float = 1.5
    keyframe_step: float = 0.1
    weight_bits: int = 3
    moment_bits: int = 3
    keyframe_bits: int = 6
    keyframe_every: int = 25
    zstd_level: int = 3

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.weight_rule in WEIGHT_RULES, f"weight_rule must be one of {WEIGHT_RULES}"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.beta >= 0, "beta must be >= 0"),
            (0 < self.weight_keep <= 1, "weight_keep must be in (0, 1]"),
            (0 < self.lr_step <= 1e6, "lr_step must be in (0, 1e6]"),
            (isinstance(self.v_step, int) and 1 <= self.v_step <= 16, "v_step must be an integer in 1..16"),
            (0 < self.m_step <= 16, "m_step must be in (0, 16]"),
            (0 < self.weight_step <= 16, "weight_step must be in (0, 16]"),
            (0 < self.keyframe_step <= 16, "keyframe_step must be in (0, 16]"),
            (1 <= self.weight_bits <= 8, "weight_bits must be in 1..8"),
            (1 <= self.moment_bits <= 8, "moment_bits must be in 1..8"),
            (2 <= self.keyframe_bits <= 8, "keyframe_bits must be in 2..8"),
            (self.keyframe_every >= 0, "keyframe_every must be >= 0"),
            (1 <= self.zstd_level <= 22, "zstd_level must be in 1..22"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(f"invalid codec parameter: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(
                f"unknown codec parameters {sorted(unknown)}: written by a newer excp? upgrade excp"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> CodecParams:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, CodecParams] = {
    # The ExCP paper's configuration (alpha 5e-5, beta 2, 4-bit codebooks), with our
    # fixes (float32 / log-domain codebooks, v > 0 guard, closed loop, zstd inside).
    "paper": CodecParams(weight_rule="paper", beta=2.0, weight_bits=4, moment_bits=4, keyframe_bits=8),
    # Half the default's errors, a keyframe every 10 links.
    "safe": CodecParams(lr_step=4.0, v_step=1, m_step=0.35, keyframe_every=10),
    # Resume fidelity across training regimes (docs/fidelity.md).
    "default": CodecParams(),
    # Twice the default's errors, keyframes half as often: for archives, not resumes.
    "max": CodecParams(lr_step=16.0, v_step=3, m_step=1.0, keyframe_every=50),
    "lossless": CodecParams(mode="lossless"),
}


def params_of(chosen: str | CodecParams | None) -> CodecParams | None:
    """A preset name, options already made, or None (the run's own), as options."""
    return preset(chosen) if isinstance(chosen, str) else chosen


def preset(name: str) -> CodecParams:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}"
        ) from None
