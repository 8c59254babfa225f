"""Uniform scalar quantization of weight residuals, entropy-coded by zstd.

The paper's rule prunes the smallest residuals and spends 2^b k-means levels on the
rest. k-means minimises the error for a fixed *number* of levels, but what a link
pays for is the *entropy* of its codes; for a fixed entropy a uniform quantizer
with many levels has less error than a few optimally placed ones (the classic
entropy-constrained result). Rounding ΔW/step to an integer also prunes: everything
within half a step of zero becomes level 0, the "not sent" of the paper's mask.

The step is a fraction of the residual's RMS, taken from the fixed strided sample,
so the precision is relative to how far the tensor moved and the same on every
device. Levels are reconstructed at the sample's mean within each bin (ΔW is peaked
around zero, so a bin's mean sits inside its midpoint); level 0 is exactly zero, so
a position that was not sent keeps its parent's value bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from excp.codec import pack
from excp.codec.stats import strided_sample

MAX_LEVEL = 127


def group_size(levels: int) -> int:
    """Codes per byte for an alphabet of 2·levels + 1 symbols: the most whose
    mixed-radix number fits in a byte (5 ternary codes, 3 quinary, 2 of up to 15
    symbols, else 1). zstd's Huffman stage spends at least a bit per byte, so a byte
    per code would cost the zero-heavy residuals about 35% over their entropy;
    grouped, the excess is a few percent."""
    alphabet = 2 * levels + 1
    size = 1
    while alphabet ** (size + 1) <= 256:
        size += 1
    return size


@dataclass
class Uniform:
    """Codes of ``n`` values in [-K, K], grouped into bytes (:func:`group_size`), and
    the float32 value of each level: ``book[code + K]``."""

    packed: torch.Tensor
    book: torch.Tensor
    n: int


def quantize(x: torch.Tensor, step_fraction: float) -> Uniform:
    """Round flat float32 ``x`` to multiples of ``step_fraction``·RMS(x)."""
    sample = strided_sample(x)
    rms = math.sqrt(float(np.mean(sample * sample))) if sample.size else 0.0
    return quantize_step(x, step_fraction * rms, sample)


def quantize_step(x: torch.Tensor, step: float, sample: np.ndarray | None = None,
                  scratch: bool = False) -> Uniform:
    """Round flat float32 ``x`` to multiples of ``step``. The step grows when needed so
    that the largest value fits in ``MAX_LEVEL`` levels: an outlier is never clipped.
    Each level is reconstructed at the mean of ``sample``'s values in its bin. With
    ``scratch`` the levels are computed in ``x`` itself (no copy of it)."""
    n = x.numel()
    if sample is None:
        sample = strided_sample(x)
    peak = 0.0
    if n:  # max |x| in one pass without an |x| copy of the tensor
        low, high = torch.aminmax(x)
        peak = max(-float(low), float(high))
    step = max(step, peak / MAX_LEVEL)
    if step == 0.0:
        return Uniform(torch.empty(0, dtype=torch.uint8, device=x.device),
                       torch.zeros(1, dtype=torch.float32, device=x.device), n)
    levels = min(MAX_LEVEL, int(round(peak / step)))
    scaled = x.mul_(1.0 / step) if scratch else torch.mul(x, 1.0 / step)
    digits = scaled.round_().clamp_(-levels, levels).add_(levels).to(torch.uint8)
    book = torch.from_numpy(level_book(sample, step, levels)).to(x.device)
    return Uniform(pack_digits(digits, levels), book, n)


def pack_digits(digits: torch.Tensor, levels: int) -> torch.Tensor:
    """Mixed-radix groups: byte j = Σ_i digits[g·j + i] · (2K+1)^i; the tail is
    padded with level 0 (digit K). No bytes at all when K = 0."""
    if levels == 0:
        return digits.new_empty(0)
    size, alphabet = group_size(levels), 2 * levels + 1
    if size == 1:
        return digits
    pad = (-digits.numel()) % size
    if pad:
        digits = torch.cat([digits, digits.new_full((pad,), levels)])
    groups = digits.view(-1, size)
    packed = groups[:, size - 1].clone()
    for i in range(size - 2, -1, -1):
        packed.mul_(alphabet).add_(groups[:, i])
    return packed


def level_book(sample: np.ndarray, step: float, levels: int) -> np.ndarray:
    """Value of each level -K..K: the sample's mean in its bin, or the bin's centre
    where the sample has no value; exactly 0 for level 0."""
    index = np.clip(np.rint(sample / step), -levels, levels).astype(np.int64) + levels
    counts = np.bincount(index, minlength=2 * levels + 1)
    sums = np.bincount(index, weights=sample, minlength=2 * levels + 1)
    centres = (np.arange(2 * levels + 1) - levels) * step
    book = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    book[levels] = 0.0
    return book.astype(np.float32)


def packed_size(n: int, levels: int) -> int:
    """Bytes that :func:`quantize` writes for ``n`` codes with K = ``levels``."""
    return 0 if levels == 0 else -(-n // group_size(levels))


def values(packed: torch.Tensor, book: torch.Tensor, n: int) -> torch.Tensor:
    """float32 value of each of the ``n`` codes: one lookup per byte in a table that
    holds every byte's group of values."""
    levels = (book.numel() - 1) // 2
    if levels == 0:
        return torch.zeros(n, dtype=torch.float32, device=book.device)
    alphabet, size = 2 * levels + 1, group_size(levels)
    byte = torch.arange(256, device=book.device)
    digits = torch.stack([byte // alphabet ** i % alphabet for i in range(size)], dim=1)
    table = book[digits]
    if pack.numpy_path(packed):
        grouped = torch.from_numpy(np.take(table.numpy(), packed.numpy(), axis=0))
    else:
        grouped = table[packed.long()]
    return grouped.view(-1)[:n]
