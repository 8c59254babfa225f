"""Which positions a link sends: joint pruning of weight residuals and Adam moments.

Thresholds come from a fixed strided sample (:mod:`excp.codec.stats`), so they are the
same on every device and never need a sort of the whole tensor.

Weight rules (per tensor):

* ``paper`` (ExCP): f = min(2.5, alpha / sqrt(mean(v))); keep ΔW where
  |ΔW| > f · median(|ΔW|).
* ``keep``: keep the largest ``weight_keep`` fraction of |ΔW| (threshold = that
  quantile of the sample). This is also the substitute when a weight has no second
  moment (weights-only input), where the paper's rule is undefined.

Moment rule: keep m and v where |m| > beta · mean(|m|), ΔW was kept, and v > 0 — the
last condition is ours: a position restored with m ≠ 0 and v = 0 makes Adam step by
lr·m/eps and blow the weight up.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from excp.codec.params import CodecParams
from excp.codec.stats import median, strided_sample

PAPER_F_CAP = 2.5


def weight_threshold(delta: torch.Tensor, v: torch.Tensor | None, params: CodecParams) -> float:
    """|ΔW| above this value is sent."""
    magnitude = np.abs(strided_sample(delta))
    if params.weight_rule == "paper" and v is not None:
        mean_v = float(strided_sample(v).mean())
        f = PAPER_F_CAP if mean_v <= 0 else min(PAPER_F_CAP, params.alpha / math.sqrt(mean_v))
        return f * median(magnitude)
    if magnitude.size == 0:
        return 0.0
    rank = int((1.0 - params.weight_keep) * (magnitude.size - 1))
    return float(np.partition(magnitude, rank)[rank])


def moment_threshold(m: torch.Tensor, params: CodecParams) -> float:
    """|m| above beta·mean(|m|) is kept (where ΔW was sent and v > 0)."""
    return params.beta * float(np.abs(strided_sample(m)).mean())
