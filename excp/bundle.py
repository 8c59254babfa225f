"""The neutral in-memory form of a checkpoint that every adapter produces and consumes.

The codec only ever sees a :class:`Bundle`: named tensors with a :class:`Role`, plus
opaque ``extras`` (bytes) that must come back bit-exact. Adapters are the only code
that knows file layouts, so the codec never has to guess what a tensor means.

Naming conventions (shared by all adapters, relied on by the codec):

* a weight is named by its key in the model's state dict, e.g. ``h.0.attn.weight``;
* its Adam moments are named ``<weight name>@exp_avg``, ``@exp_avg_sq`` and
  ``@max_exp_avg_sq`` and carry ``param=<weight name>``;
* ``other`` tensors (integer tensors, buffers, frozen parameters, RNG states) use any
  unique name the adapter likes; they are stored losslessly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
import xxhash


class Role(str, Enum):
    WEIGHT = "weight"
    EXP_AVG = "exp_avg"
    EXP_AVG_SQ = "exp_avg_sq"
    MAX_EXP_AVG_SQ = "max_exp_avg_sq"
    OTHER = "other"


MOMENT_ROLES = (Role.EXP_AVG, Role.EXP_AVG_SQ, Role.MAX_EXP_AVG_SQ)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def moment_name(param: str, role: Role) -> str:
    """The bundle name of a moment of weight ``param``."""
    return f"{param}@{role.value}"


@dataclass
class TensorEntry:
    """One tensor of a checkpoint. ``param`` links a moment to its weight."""

    name: str
    role: Role
    tensor: torch.Tensor
    param: str | None = None


@dataclass
class Bundle:
    """A checkpoint as excp sees it.

    ``layout`` names the adapter that made it (``torch_dict``, ``hf_trainer``,
    ``state_dict``) so restore can write the same layout back; ``extras`` are opaque
    bytes the adapter needs to rebuild everything that is not a tensor; ``step`` is
    the training step the checkpoint says it was taken at, when it says so. ``lr``
    holds each weight's learning rate at that step (its optimizer group's), where the
    checkpoint says: the codec sizes weight errors in Adam steps of that length.
    """

    layout: str
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    extras: dict[str, bytes] = field(default_factory=dict)
    step: int | None = None
    lr: dict[str, float] = field(default_factory=dict)

    def add(self, entry: TensorEntry) -> None:
        if entry.name in self.tensors:
            raise ValueError(f"duplicate tensor name {entry.name!r} in bundle")
        self.tensors[entry.name] = entry

    def weights(self) -> Iterator[TensorEntry]:
        return (e for e in self.tensors.values() if e.role is Role.WEIGHT)

    def moments(self, param: str) -> dict[Role, TensorEntry]:
        """The Adam moments stored for weight ``param`` (empty for weights-only input)."""
        found = {}
        for role in MOMENT_ROLES:
            entry = self.tensors.get(moment_name(param, role))
            if entry is not None:
                found[role] = entry
        return found

    def num_parameters(self) -> int:
        return sum(e.tensor.numel() for e in self.weights())

    def digest(self) -> str:
        """Content hash of every tensor (name, role, dtype, shape, bytes) and extra.

        Tells an identical re-push (a no-op) from a different checkpoint under the
        same step. xxh3-128 because it runs at memory speed.
        """
        return content_hash(self.tensors.values(), self.extras)


def content_hash(entries: Iterable[TensorEntry], extras: dict[str, bytes]) -> str:
    """xxh3-128 of the tensors in the order given (name, role, dtype, shape, bytes) and
    of the extras in name order."""
    hasher = xxhash.xxh3_128()
    for entry in entries:
        t = entry.tensor.detach().contiguous().cpu()
        hasher.update(f"{entry.name}|{entry.role.value}|{t.dtype}|{tuple(t.shape)}|".encode())
        hasher.update(t.view(-1).view(torch.uint8).numpy())
    for name in sorted(extras):
        hasher.update(f"{name}|{len(extras[name])}|".encode())
        hasher.update(extras[name])
    return hasher.hexdigest()
