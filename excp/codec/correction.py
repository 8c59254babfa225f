"""Bit-exact coding of a tensor against an approximation of it (its lossy reconstruction).

A lossy link restores every weight and moment close to the original, so the original's
bit pattern differs from the reconstruction's mostly in the low mantissa bytes. Two
ways of writing that difference leave the high byte planes nearly all zero: the XOR of
the two bit patterns (what lossless mode does against a parent), and their wrapping
integer difference, which stays small where a value crossed a power of two (an exponent
change that makes the XOR large). Where the reconstruction is far off (a moment the
lossy codec pruned to zero), the raw tensor compresses better than either. So each
tensor is coded all three ways and the one zstd stores smallest is kept; which one is
the unit's ``op``.
"""

from __future__ import annotations

import torch
import zstandard

from excp.codec import lossless
from excp.codec.pack import as_bits, from_planes, to_planes
from excp.codec.types import Encoded

OPS = ("raw", "xor", "sub")


def _planes(bits: torch.Tensor) -> dict[str, torch.Tensor]:
    planes = to_planes(bits).view(bits.element_size(), -1)
    return {f"plane{i}": p for i, p in enumerate(planes)}


def _stored(streams: dict[str, torch.Tensor], level: int) -> int:
    """What zstd makes of the streams: how the candidates are compared."""
    compressor = zstandard.ZstdCompressor(level=level)
    return sum(len(compressor.compress(s.cpu().numpy().tobytes())) for s in streams.values())


def candidates(tensor: torch.Tensor, approx: torch.Tensor | None) -> dict[str, Encoded]:
    """Every way of coding ``tensor`` exactly (``raw`` alone without an approximation of
    the same dtype and shape)."""
    found = {"raw": Encoded({"op": "raw"}, lossless.encode(tensor, None).streams)}
    if approx is not None and approx.dtype == tensor.dtype and approx.shape == tensor.shape \
            and tensor.dtype.is_floating_point:
        bits, near = as_bits(tensor), as_bits(approx.to(tensor.device))
        found["xor"] = Encoded({"op": "xor"}, _planes(bits ^ near))
        found["sub"] = Encoded({"op": "sub"}, _planes(bits - near))
    return found


def encode(tensor: torch.Tensor, approx: torch.Tensor | None, level: int = 3) -> Encoded:
    """Code ``tensor`` exactly against ``approx``: the smallest of :func:`candidates`."""
    options = candidates(tensor, approx)
    return min(options.values(), key=lambda enc: _stored(enc.streams, level))


def decode(enc: Encoded, dtype: torch.dtype, shape: tuple[int, ...],
           approx: torch.Tensor | None) -> torch.Tensor:
    """The original tensor from its correction and the same ``approx`` it was coded against."""
    op = enc.meta.get("op")
    planes = torch.cat([enc.streams[f"plane{i}"] for i in range(len(enc.streams))])
    if op == "raw":
        return from_planes(planes, dtype, shape)
    if op not in OPS:
        raise ValueError(f"unknown correction op {op!r}")
    if approx is None or approx.dtype != dtype or tuple(approx.shape) != tuple(shape):
        raise ValueError("a correction needs the reconstruction it was coded against")
    near = as_bits(approx)
    delta = from_planes(planes, near.dtype, (-1,))
    bits = delta ^ near if op == "xor" else delta + near
    return bits.view(dtype).view(shape)
