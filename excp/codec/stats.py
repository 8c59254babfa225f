"""Statistics computed from a fixed, strided sample of a tensor.

Thresholds and scales must be the same on CPU and GPU and must not need a sort of
the whole tensor (``torch.quantile`` refuses more than 16M elements). A strided
sample of at most ``SAMPLE_SIZE`` elements, moved to the host and reduced in
float64, gives both: the same positions on every device and an exact, ordered sum.
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_SIZE = 1 << 16


def strided_sample(x: torch.Tensor, size: int = SAMPLE_SIZE) -> np.ndarray:
    """Every ``ceil(n / size)``-th element of flat ``x``, as float64 on the host."""
    flat = x.reshape(-1)
    stride = max(1, -(-flat.numel() // size))
    return flat[::stride].double().cpu().numpy()


def median(sample: np.ndarray) -> float:
    """Lower median, as ``torch.kthvalue`` would give it; 0.0 for an empty sample."""
    if sample.size == 0:
        return 0.0
    return float(np.partition(sample, (sample.size - 1) // 2)[(sample.size - 1) // 2])
