"""The checkpoints a benchmark codes: the workload's, kept in memory, or a user's files.

Both are a :class:`CheckpointSource`: a fixed sequence that hands out each checkpoint
as a fresh :class:`~excp.bundle.Bundle` on demand. User checkpoints are read from disk
each time they are needed rather than held, since a user's model may not fit in memory
several times over; the reads are never timed.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from excp import api
from excp.adapters import hf_trainer, load_checkpoint
from excp.bundle import Bundle
from excp.chain import raw_size
from excp.errors import InvalidInput, NotFound

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class CheckpointSource(ABC):
    """An ordered run of checkpoints of one model; ``labels`` name them in reports."""

    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def bundle(self, index: int) -> Bundle:
        """Checkpoint ``index`` (0-based), as a bundle sharing nothing a coder may change."""


class MemorySource(CheckpointSource):
    """Checkpoint dicts already in memory (the workload's reference run)."""

    def __init__(self, checkpoints: Sequence[dict], labels: Sequence[str]) -> None:
        self._checkpoints = list(checkpoints)
        self.labels = list(labels)

    def bundle(self, index: int) -> Bundle:
        return api.to_bundle(self._checkpoints[index])


class FileSource(CheckpointSource):
    """Checkpoint files or Hugging Face Trainer directories, read when asked for."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.labels = [str(p) for p in self.paths]

    def bundle(self, index: int) -> Bundle:
        return load_checkpoint(self.paths[index])


def _natural_key(path: Path) -> list[int | str]:
    """``checkpoint-900`` before ``checkpoint-1000``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return hf_trainer.is_trainer_dir(path)
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES


def resolve(paths: Sequence[str | Path]) -> list[Path]:
    """The checkpoints named by ``paths``, in the order given.

    A file or a Trainer checkpoint directory is one checkpoint; any other directory
    stands for the checkpoint files and Trainer directories directly inside it, in
    natural order (``step-900`` before ``step-1000``).
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NotFound(f"{path} does not exist; pass checkpoint files or directories")
        if path.is_file() or hf_trainer.is_trainer_dir(path):
            found.append(path)
            continue
        inside = sorted((child for child in path.iterdir() if _is_checkpoint(child)), key=_natural_key)
        if not inside:
            raise InvalidInput(
                f"no checkpoints found in {path}: it holds no {'/'.join(CHECKPOINT_SUFFIXES)} files "
                "and no Hugging Face checkpoint directories; pass checkpoint files or such a directory")
        found.extend(inside)
    if not found:
        raise InvalidInput("no checkpoints given: pass checkpoint files or directories after --checkpoints")
    return found


def survey(source: CheckpointSource) -> list[dict[str, Any]]:
    """Label, raw bytes and weights of each checkpoint, refusing checkpoints that are not
    of one model (weights with the same names, dtypes and shapes): a chain codes each
    against the one before, and the figures would mix models. Reads every checkpoint
    once, keeping only its description."""
    first: dict[str, tuple[str, tuple[int, ...]]] | None = None
    found = []
    for index, label in enumerate(source.labels):
        bundle = source.bundle(index)
        if bundle.num_parameters() == 0:
            raise InvalidInput(f"{label} holds no floating-point weights: pass a model checkpoint")
        signature = {e.name: (str(e.tensor.dtype), tuple(e.tensor.shape)) for e in bundle.weights()}
        if first is None:
            first = signature
        elif signature != first:
            raise InvalidInput(f"{label} is not a checkpoint of the same model as {source.labels[0]} "
                               f"({_difference(first, signature)}); benchmark checkpoints of one model")
        found.append({"label": label, "step": bundle.step, "raw_bytes": raw_size(bundle),
                      "num_parameters": bundle.num_parameters()})
    return found


def _difference(first: dict[str, tuple[str, tuple[int, ...]]],
                other: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    for name in first:
        if name not in other:
            return f"it lacks weight {name!r}"
        if other[name] != first[name]:
            (dtype, shape), (want_dtype, want_shape) = other[name], first[name]
            return f"weight {name!r} is {dtype} {shape}, not {want_dtype} {want_shape}"
    extra = next(name for name in other if name not in first)
    return f"it has an extra weight {extra!r}"
