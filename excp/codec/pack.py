"""Bit-level layouts and the few index primitives the codec is built from.

Masks are packed 8 positions per byte, least significant bit first (numpy's
``bitorder="little"``). Byte planes split each element into its bytes (all low
bytes, then the next, ...), so zstd sees the slowly varying exponent bytes of floats
next to each other.

On CPU tensors, packing, ``flatnonzero`` and codebook lookups go through numpy views of
the same memory: torch's CPU kernels for them are 3-10x slower on this workload, and
the results are bit-identical. CUDA tensors use the torch formulation; the tests
run it on CPU tensors too (by patching :func:`numpy_path`), so CI without a GPU checks
the code a GPU runs.
"""

from __future__ import annotations

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t`` is coded through numpy (CPU tensors) rather than torch."""
    return t.device.type == "cpu"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ceil(n/8) bytes, LSB first."""
    if numpy_path(mask):
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the first ``n`` bits as a bool tensor."""
    if numpy_path(packed):
        bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:n].bool()


def flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the true elements of a 1-D bool tensor, ascending, as int64."""
    if numpy_path(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).view(-1)


def lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` for uint8 codes; numpy takes uint8 indices as they are, where
    torch first widens them to int64 (3x slower on this workload)."""
    if numpy_path(codes):
        return torch.from_numpy(np.take(table.numpy(), codes.numpy()))
    return table[codes.long()]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor of the same element size (no copy)."""
    return t.contiguous().view(-1).view(_INT_OF_SIZE[t.element_size()])


def to_planes(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 byte planes of ``t``: byte 0 of every element, then byte 1, ..."""
    size = t.element_size()
    raw = t.contiguous().view(-1).view(torch.uint8)
    return raw.view(-1, size).t().contiguous().view(-1)


def from_planes(planes: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_planes`."""
    size = torch.empty(0, dtype=dtype).element_size()
    return planes.view(size, -1).t().contiguous().view(-1).view(dtype).view(shape)
