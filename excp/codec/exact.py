"""A whole checkpoint coded exactly against its lossy link's restored bundle: an exact copy.

Only what the link does not already give back bit for bit is written: a ``correction``
unit per tensor whose bytes differ (the weights and moments; tensors the link stores
losslessly, such as integer state, match and cost nothing) and any extra that differs.
Decoding applies those to the link's restored bundle. :func:`content_digest` of the
original is stored with the copy and checked after decoding, so an exact restore is
the original or an error, never something in between.
"""

from __future__ import annotations

import torch

from excp.bundle import Bundle, TensorEntry, content_hash
from excp.codec import correction
from excp.codec.pipeline import describe, read_streams, tensor_spec
from excp.codec.types import Encoded
from excp.errors import CorruptData
from excp.format.container import ArchiveReader, ArchiveWriter

CODEC = "correction"


def content_digest(bundle: Bundle) -> str:
    """The bundle's content hash over its tensors in name order: the same for a
    checkpoint and its exact restore, whatever order each holds its tensors in."""
    return content_hash((bundle.tensors[name] for name in sorted(bundle.tensors)), bundle.extras)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and signed zeros included, which ``torch.equal`` blurs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def encode_exact(bundle: Bundle, lossy: Bundle, writer: ArchiveWriter, level: int) -> None:
    """Write into ``writer`` what turns ``lossy`` (the link's restore) into ``bundle``."""
    for name, entry in bundle.tensors.items():
        original = entry.tensor.detach().cpu()
        restored = lossy.tensors.get(name)
        approx = None if restored is None else restored.tensor
        if approx is not None and _same_bits(original, approx):
            continue
        enc = correction.encode(original, approx, level)
        writer.add_unit(name, CODEC, [describe(TensorEntry(name, entry.role, original, entry.param))],
                        enc.meta, enc.streams)
    for name, data in bundle.extras.items():
        if lossy.extras.get(name) != data:
            writer.add_extra(name, data)


def decode_exact(reader: ArchiveReader, lossy: Bundle, digest: str) -> Bundle:
    """``lossy`` with the corrections of ``reader`` applied (in place), checked against
    the original's :func:`content_digest`."""
    for unit in reader.units:
        label = f"{reader.label}, tensor {unit.name!r}"
        if unit.codec != CODEC or len(unit.tensors) != 1:
            raise CorruptData(f"{label}: an exact copy holds one tensor per {CODEC!r} unit")
        spec = unit.tensors[0]
        role, dtype, shape = tensor_spec(spec, label)
        restored = lossy.tensors.get(spec["name"])
        approx = None if restored is None else restored.tensor
        try:
            streams = read_streams(reader, unit, torch.device("cpu"))
            tensor = correction.decode(Encoded(unit.meta, streams), dtype, shape, approx)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"{label}: cannot decode ({exc})") from None
        lossy.tensors[spec["name"]] = TensorEntry(spec["name"], role, tensor, spec.get("param"))
    for name in reader.extras:
        lossy.extras[name] = reader.read_extra(name)
    if content_digest(lossy) != digest:
        raise CorruptData(f"{reader.label}: the exact copy does not give back the checkpoint it was "
                          "made of; restore with --lossy")
    return lossy
