"""The compressors the benchmark compares, behind one interface.

A :class:`Contender` names a compressor and says whether it is lossless; its
:meth:`Contender.chain` starts a fresh :class:`ChainCoder`, which codes the checkpoints
of one run in order (so a compressor that codes against the previous checkpoint, as
excp does, can) and decodes each of them back to a :class:`~excp.bundle.Bundle`.

Every contender stores the whole checkpoint (weights, moments, integer tensors and
the opaque extras a resume needs), so stored sizes are comparable; every ratio is
measured against the same denominator, :func:`excp.chain.raw_size`.

Contenders:

* ``torch-save``: ``torch.save`` of the checkpoint's tensors and extras, as is;
* ``zstd``: zstd level 3 over those ``torch.save`` bytes;
* ``byteplane``: our look-alike of ZipNN: each float tensor split into byte planes
  (:func:`excp.codec.pack.to_planes`), zstd-3 per plane; no chain, no XOR;
* ``zipnn``: the real ``zipnn`` package, per float tensor (optional dependency);
* ``lossless``, ``paper``, ``safe``, ``default``, ``max``: excp presets, pushed as a
  chain into a memory store, each link coded against the previous reconstruction.
"""

from __future__ import annotations

import importlib
import io
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch
import zstandard

from excp.bundle import FLOAT_DTYPES, Bundle, Role, TensorEntry
from excp.chain import Chain
from excp.codec.pack import from_planes, to_planes
from excp.codec.params import PRESETS, CodecParams
from excp.codec.pipeline import Reconstruction, describe
from excp.errors import InvalidInput
from excp.store import MemoryStore

ZSTD_LEVEL = 3
ZIPNN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ChainCoder(ABC):
    """One run's checkpoints, coded in order.

    Call sequence: :meth:`encode` for each checkpoint in step order; then any number
    of :meth:`decode` passes (each yields every checkpoint coded so far, in order, doing
    the work of one checkpoint per item so a caller can time each) or
    :meth:`restore_last` after each encode (the closed loop).
    """

    @abstractmethod
    def encode(self, bundle: Bundle, step: int) -> int:
        """Code ``bundle`` after the checkpoints coded before it; returns its stored bytes.
        ``step`` is larger than every step coded before."""

    @abstractmethod
    def decode(self) -> Iterator[Bundle]:
        """Every checkpoint coded so far, reconstructed, in the order it was coded."""

    @abstractmethod
    def restore_last(self) -> Bundle:
        """The reconstruction of the checkpoint coded last."""


class Contender(ABC):
    """A compressor under test: ``key`` (for ``--contenders``), display ``name``,
    ``lossless`` (claims bit-exact reconstruction; the benchmark verifies it)."""

    key: str
    name: str
    lossless: bool

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (e.g. a missing package), or None."""
        return None

    @abstractmethod
    def chain(self) -> ChainCoder:
        """A fresh coder for one run."""


# --- standalone coders: every checkpoint coded on its own --------------------------


class _Standalone(ChainCoder):
    """Coders without memory between checkpoints: one payload per checkpoint, kept in
    memory until the coder is dropped."""

    def __init__(self, pack: Callable[[Bundle], tuple[Any, int]], unpack: Callable[[Any], Bundle]) -> None:
        self._pack, self._unpack = pack, unpack
        self._payloads: list[Any] = []

    def encode(self, bundle: Bundle, step: int) -> int:
        payload, size = self._pack(bundle)
        self._payloads.append(payload)
        return size

    def decode(self) -> Iterator[Bundle]:
        for payload in self._payloads:
            yield self._unpack(payload)

    def restore_last(self) -> Bundle:
        return self._unpack(self._payloads[-1])


def _dtype(name: str) -> torch.dtype:
    """``torch.float32`` from ``"float32"`` (any torch dtype, not only those excp codes)."""
    return getattr(torch, name)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes (a view when it is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _entry(meta: dict, tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry(meta["name"], Role(meta["role"]), tensor, meta["param"])


class TorchSave(Contender):
    """``torch.save`` of every tensor and extra: what a training script writes by default."""

    key, name, lossless = "torch-save", "torch.save", True

    @staticmethod
    def save(bundle: Bundle) -> bytes:
        buffer = io.BytesIO()
        torch.save({
            "meta": {"layout": bundle.layout, "step": bundle.step,
                     "tensors": [describe(e) for e in bundle.tensors.values()]},
            "tensors": {e.name: e.tensor for e in bundle.tensors.values()},
            "extras": {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else
                       torch.empty(0, dtype=torch.uint8) for k, v in bundle.extras.items()},
        }, buffer)
        return buffer.getvalue()

    @staticmethod
    def load(data: bytes) -> Bundle:
        obj = torch.load(io.BytesIO(data), weights_only=True)
        meta = obj["meta"]
        bundle = Bundle(meta["layout"], step=meta["step"])
        for spec in meta["tensors"]:
            bundle.add(_entry(spec, obj["tensors"][spec["name"]]))
        bundle.extras = {k: v.numpy().tobytes() for k, v in obj["extras"].items()}
        return bundle

    def chain(self) -> ChainCoder:
        def pack(bundle: Bundle) -> tuple[bytes, int]:
            data = self.save(bundle)
            return data, len(data)
        return _Standalone(pack, self.load)


class ZstdTorchSave(Contender):
    """zstd level 3 over the ``torch.save`` bytes: the usual "just compress the file"."""

    key, name, lossless = "zstd", "zstd-3 over torch.save", True

    def chain(self) -> ChainCoder:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        decompressor = zstandard.ZstdDecompressor()

        def pack(bundle: Bundle) -> tuple[bytes, int]:
            data = compressor.compress(TorchSave.save(bundle))
            return data, len(data)
        return _Standalone(pack, lambda data: TorchSave.load(decompressor.decompress(data)))


@dataclass
class _Frames:
    """A checkpoint as a JSON table plus zstd frames; its size counts both."""

    table: bytes
    frames: list[bytes] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.table) + sum(len(f) for f in self.frames)


class _PerTensor(Contender):
    """Codes each tensor on its own: float tensors of ``float_dtypes`` by
    :meth:`code_float`, everything else (integer tensors, extras) as zstd-3 of its bytes."""

    lossless = True
    float_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES

    def __init__(self) -> None:
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._decompressor = zstandard.ZstdDecompressor()

    @abstractmethod
    def code_float(self, tensor: torch.Tensor) -> list[bytes]:
        """Frames of one non-empty float tensor."""

    @abstractmethod
    def decode_float(self, frames: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`code_float`."""

    def _coded_as_float(self, dtype: torch.dtype, numel: int) -> bool:
        return dtype in self.float_dtypes and numel > 0

    def pack(self, bundle: Bundle) -> tuple[_Frames, int]:
        tensors, frames = [], []
        for entry in bundle.tensors.values():
            t = entry.tensor
            coded = (self.code_float(t) if self._coded_as_float(t.dtype, t.numel())
                     else [self._compressor.compress(_raw_bytes(t))])
            tensors.append({**describe(entry), "frames": len(coded)})
            frames.extend(coded)
        frames.extend(self._compressor.compress(data) for data in bundle.extras.values())
        table = json.dumps({"layout": bundle.layout, "step": bundle.step, "tensors": tensors,
                            "extras": list(bundle.extras)}).encode()
        payload = _Frames(table, frames)
        return payload, payload.size

    def unpack(self, payload: _Frames) -> Bundle:
        table = json.loads(payload.table)
        bundle = Bundle(table["layout"], step=table["step"])
        frames = iter(payload.frames)
        for spec in table["tensors"]:
            dtype, shape = _dtype(spec["dtype"]), tuple(spec["shape"])
            coded = [next(frames) for _ in range(spec["frames"])]
            if self._coded_as_float(dtype, math.prod(shape)):
                tensor = self.decode_float(coded, dtype, shape)
            else:
                tensor = torch.empty(shape, dtype=dtype)
                tensor.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(
                    self._decompressor.decompress(coded[0]), dtype=np.uint8)
            bundle.add(_entry(spec, tensor))
        bundle.extras = {name: self._decompressor.decompress(next(frames)) for name in table["extras"]}
        return bundle

    def chain(self) -> ChainCoder:
        return _Standalone(self.pack, self.unpack)


class BytePlaneZstd(_PerTensor):
    """ZipNN's idea with our primitives: byte planes of each float tensor, zstd-3 per
    plane. The same as excp lossless without the XOR against the previous checkpoint,
    so the two side by side show what the chain adds."""

    key, name = "byteplane", "byte-plane zstd-3 (ZipNN-style)"

    def code_float(self, tensor: torch.Tensor) -> list[bytes]:
        planes = to_planes(tensor.detach()).view(tensor.element_size(), -1)
        return [self._compressor.compress(plane.numpy()) for plane in planes]

    def decode_float(self, frames: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        planes = torch.empty(n * len(frames), dtype=torch.uint8)
        view = planes.numpy()
        for i, frame in enumerate(frames):
            view[i * n:(i + 1) * n] = np.frombuffer(self._decompressor.decompress(frame), dtype=np.uint8)
        return from_planes(planes, dtype, shape)


class ZipNN(_PerTensor):
    """The ``zipnn`` package (IBM's ZipNN: byte grouping, then Huffman or zstd), one call
    per float tensor with its defaults (zstd level 3), on as many threads as torch uses.

    ZipNN reorders the bytes of the tensor it is given in place, so it gets a copy; the
    copy counts in the encode time, as it would for any caller that keeps training.
    float64 tensors, which ZipNN refuses, are coded like integer tensors.
    """

    key = "zipnn"
    float_dtypes = ZIPNN_DTYPES

    def __init__(self) -> None:
        super().__init__()
        self._zipnn: Any = None
        try:
            self.version: str | None = metadata.version("zipnn")
        except metadata.PackageNotFoundError:
            self.version = None
        self.name = "ZipNN" if self.version is None else f"ZipNN {self.version}"

    def unavailable(self) -> str | None:
        if self.version is None:
            return "not installed (pip install -e '.[bench]' from the excp checkout)"
        try:
            importlib.import_module("zipnn")
        except ImportError as exc:
            return f"not importable ({exc})"
        return None

    def _coder(self) -> Any:
        if self._zipnn is None:
            self._zipnn = importlib.import_module("zipnn").ZipNN(
                input_format="torch", threads=torch.get_num_threads())
        return self._zipnn

    def code_float(self, tensor: torch.Tensor) -> list[bytes]:
        return [bytes(self._coder().compress(tensor.detach().clone()))]

    def decode_float(self, frames: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self._coder().decompress(frames[0]).view(dtype).reshape(shape)


# --- excp ---------------------------------------------------------------------------


class _ExcpChain(ChainCoder):
    """A run in a memory store, pushed through :class:`~excp.chain.Chain` with the
    previous reconstruction kept in memory (the training-loop hook's closed loop).

    ``Chain.push`` rather than ``api.push``: the API also writes the head's
    reconstruction to the on-disk cache of the CLI, a disk write that is not part of
    compressing and that a training loop keeping ``parent_recon`` never needs.
    """

    def __init__(self, params: CodecParams) -> None:
        self._chain = Chain(MemoryStore(), "bench")
        self._chain.create(params, None)
        self._recon: Reconstruction | None = None
        self._parent: Reconstruction | None = None

    def encode(self, bundle: Bundle, step: int) -> int:
        self._parent = self._recon
        result, self._recon = self._chain.push(bundle, step, lambda head: self._parent)
        return result.commit.size

    def decode(self) -> Iterator[Bundle]:
        recon: Reconstruction | None = None
        for commit in self._chain.commits():
            bundle, recon = self._chain.read(commit, None if commit.keyframe else recon, "cpu",
                                             weights_only=False)
            yield bundle

    def restore_last(self) -> Bundle:
        head = self._chain.head()
        assert head is not None, "restore_last before any encode"
        parent = None if head.keyframe else self._parent
        return self._chain.read(head, parent, "cpu", weights_only=False)[0]


class Excp(Contender):
    """An excp preset (``excp.codec.params.PRESETS``)."""

    DESCRIPTIONS = {
        "lossless": "excp lossless",
        "paper": "excp paper (ExCP: α 5e-5, β 2, 4-bit)",
        "safe": "excp safe",
        "default": "excp default",
        "max": "excp max",
    }

    def __init__(self, preset: str) -> None:
        self.key = preset
        self.params = PRESETS[preset]
        self.name = self.DESCRIPTIONS.get(preset, f"excp {preset}")
        self.lossless = self.params.mode == "lossless"

    def chain(self) -> ChainCoder:
        return _ExcpChain(self.params)


def all_contenders() -> list[Contender]:
    """Every contender, in the order the table lists them."""
    return [TorchSave(), ZstdTorchSave(), BytePlaneZstd(), ZipNN(),
            *(Excp(name) for name in ("lossless", "paper", "safe", "default", "max"))]


KEYS = tuple(c.key for c in all_contenders())


def select(keys: Sequence[str] | None) -> list[Contender]:
    """The contenders named by ``keys`` (all when None), in table order."""
    contenders = all_contenders()
    if keys is None:
        return contenders
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        raise InvalidInput(f"unknown contender {unknown[0]!r}: choose from {', '.join(KEYS)}")
    if not keys:
        raise InvalidInput(f"no contenders selected: name at least one of {', '.join(KEYS)}")
    return [c for c in contenders if c.key in keys]
