"""Bit-exact coding: byte planes, optionally XOR-ed against the parent's tensor.

Consecutive checkpoints share sign, exponent and high mantissa bits; XOR against the
parent turns those into zero bytes, and splitting into byte planes lets zstd see the
zero-heavy planes as long runs. Each plane is its own stream, so zstd fits a Huffman
table per plane. Without a parent this is ZipNN-style byte grouping.
"""

from __future__ import annotations

import torch

from excp.codec.pack import as_bits, from_planes, to_planes
from excp.codec.types import Encoded


def encode(tensor: torch.Tensor, parent: torch.Tensor | None) -> Encoded:
    """Code ``tensor`` exactly; ``parent`` (same dtype and shape) enables XOR deltas."""
    xor = parent is not None
    bits = as_bits(tensor)
    if xor:
        bits = bits ^ as_bits(parent)
    planes = to_planes(bits).view(tensor.element_size(), -1)
    return Encoded(meta={"xor": xor}, streams={f"plane{i}": p for i, p in enumerate(planes)})


def decode(enc: Encoded, dtype: torch.dtype, shape: tuple[int, ...],
           parent: torch.Tensor | None) -> torch.Tensor:
    planes = torch.cat([enc.streams[f"plane{i}"] for i in range(len(enc.streams))])
    if enc.meta["xor"]:
        if parent is None:
            raise ValueError("XOR-coded tensor needs its parent")
        int_dtype = as_bits(parent).dtype
        bits = from_planes(planes, int_dtype, (-1,)) ^ as_bits(parent)
        return bits.view(dtype).view(shape)
    return from_planes(planes, dtype, shape)
