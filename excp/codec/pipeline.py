"""A whole checkpoint through the codec: Bundle → coded units in an archive, and back.

This is where the chain's state meets the per-tensor codecs. A *reconstruction* is
what restore produces for the tensors the next link is coded against: the weights
(lossy mode) or the weights and moments (lossless mode, whose XOR deltas need them).
The encoder returns the reconstruction it just committed to, so the chain never has
to decode what it has just written.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from excp.bundle import MOMENT_ROLES, Bundle, Role, TensorEntry
from excp.codec import adam, lossless, lossy, uniform
from excp.codec.params import CodecParams
from excp.codec.types import Encoded
from excp.errors import ChainMismatch, CorruptData
from excp.format.container import ArchiveReader, ArchiveWriter, Unit

Reconstruction = dict[str, torch.Tensor]
DECODE_THREADS = 2

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}


def describe(entry: TensorEntry) -> dict[str, Any]:
    """An entry of the archive's tensor table (docs/format.md); ``DTYPES`` reads its dtype back."""
    return {"name": entry.name, "role": entry.role.value, "param": entry.param,
            "dtype": str(entry.tensor.dtype).removeprefix("torch."),
            "shape": list(entry.tensor.shape)}


def check_parent(entry: TensorEntry, parent: torch.Tensor | None, label: str) -> None:
    if parent is not None and (parent.shape != entry.tensor.shape
                               or parent.dtype != entry.tensor.dtype):
        raise ChainMismatch(
            f"{label}: tensor {entry.name!r} is {entry.tensor.dtype} {tuple(entry.tensor.shape)} "
            f"but its parent has {parent.dtype} {tuple(parent.shape)}; a chain needs the same "
            "shapes throughout: push this checkpoint to a new --run")


class _Background:
    """Runs the writer's entropy stage on one background thread, in submission order,
    while the caller codes the next unit; at most ``depth`` units are in flight, which
    bounds the memory held by coded-but-unwritten streams.

    A unit coded on a GPU is copied to pinned host memory asynchronously as it is
    submitted (:func:`_to_host`); the background thread waits for that copy alone, so
    the GPU goes on to the next tensor while zstd runs on the host. Only the packed
    streams cross, never a tensor-sized buffer of floats.
    """

    def __init__(self, writer: ArchiveWriter, depth: int = 2) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()
        self._depth = depth

    def add_unit(self, name: str, codec: str, tensors: list[dict[str, Any]], meta: dict[str, Any],
                 streams: dict[str, Any]) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        host, arrived = _to_host(streams)

        def write() -> None:
            if arrived is not None:
                arrived.synchronize()
            self._writer.add_unit(name, codec, tensors, meta, host)

        self._pending.append(self._pool.submit(write))

    def drain(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(cancel_futures=True)


def _to_host(streams: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.Event | None]:
    """Start copying a unit's CUDA streams into pinned host buffers (PyTorch's caching
    host allocator reuses them); returns the host streams and an event recorded after
    the copies, or None when every stream was on the host already. The copies are
    queued on the current stream, behind the kernels that made the streams."""
    host, arrived = dict(streams), None
    for name, data in streams.items():
        if isinstance(data, torch.Tensor) and data.is_cuda:
            host[name] = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host[name].copy_(data, non_blocking=True)
            arrived = torch.cuda.Event()
    if arrived is not None:
        arrived.record()
    return host, arrived


def encode_bundle(bundle: Bundle, writer: ArchiveWriter, params: CodecParams,
                  parent: Reconstruction | None, keyframe: bool, label: str,
                  progress: Callable[[int], None] | None = None) -> Reconstruction:
    """Code every tensor and extra of ``bundle`` into ``writer``; return the new
    reconstruction. ``parent`` is None for a standalone keyframe."""
    recon: Reconstruction = {}
    out = _Background(writer)
    try:
        for weight in list(bundle.weights()):
            recon.update(_encode_weight(bundle, weight, out, params, parent, keyframe, label))
            if progress:
                progress(weight.tensor.numel())
        for entry in bundle.tensors.values():
            if entry.role is Role.OTHER:
                enc = lossless.encode(entry.tensor, None)
                out.add_unit(entry.name, "planes", [describe(entry)], enc.meta, enc.streams)
    finally:
        out.drain()
    for name, data in bundle.extras.items():
        writer.add_extra(name, data)
    return recon


def _encode_weight(bundle: Bundle, weight: TensorEntry, out: _Background, params: CodecParams,
                   parent: Reconstruction | None, keyframe: bool, label: str) -> Reconstruction:
    """Code one weight with its moments; returns their part of the reconstruction."""
    moments = bundle.moments(weight.name)
    prev = None if parent is None else parent.get(weight.name)
    if parent is not None and prev is None and not keyframe and params.mode == "excp":
        raise ChainMismatch(
            f"{label}: tensor {weight.name!r} is new in this checkpoint; a chain needs the "
            "same tensors throughout: push this checkpoint to a new --run")
    if params.mode == "lossless":
        recon = {}
        for entry in [weight, *moments.values()]:
            prev_t = None if parent is None else parent.get(entry.name)
            check_parent(entry, prev_t, label)
            enc = lossless.encode(entry.tensor, prev_t)
            out.add_unit(entry.name, "planes", [describe(entry)], enc.meta, enc.streams)
            recon[entry.name] = entry.tensor
        return recon
    check_parent(weight, prev, label)
    seed = zlib.crc32(f"{weight.name}|{bundle.step}".encode())  # each unit of a chain its own dither
    codec, enc, restored = encode_unit(weight.name, weight.tensor, None if keyframe else prev,
                                       {role: e.tensor for role, e in moments.items()}, params, keyframe,
                                       bundle.lr.get(weight.name), seed)
    out.add_unit(weight.name, codec, [describe(weight)] + [describe(e) for e in moments.values()],
                 enc.meta, enc.streams)
    return {weight.name: restored}


def encode_unit(name: str, weight: torch.Tensor, parent: torch.Tensor | None,
                moments: dict[Role, torch.Tensor], params: CodecParams, keyframe: bool,
                lr: float | None = None, seed: int = 0) -> tuple[str, Encoded, torch.Tensor]:
    """One weight and its moments through the lossy codec its rule names: the unit
    codec's name, the unit, and the weight's reconstruction (``lr`` and the dither
    ``seed`` are the ``adam`` rule's)."""
    lossy.check_finite(name, weight, moments)
    if params.weight_rule == "adam":
        return ("adam", *adam.encode_unit(weight, parent, moments, params, keyframe, lr, seed))
    return ("excp", *lossy.encode_unit(weight, parent, moments, params, keyframe))


def tensor_spec(spec: dict[str, Any], label: str) -> tuple[Role, torch.dtype, tuple[int, ...]]:
    try:
        role = Role(spec["role"])
        dtype = DTYPES[spec["dtype"]]
        shape = tuple(_dimension(d) for d in spec["shape"])
        if not isinstance(spec["name"], str) or not isinstance(spec.get("param"), str | None):
            raise TypeError("name and param must be strings")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptData(f"{label}: bad tensor table entry ({exc!r})") from None
    if any(d < 0 for d in shape):
        raise CorruptData(f"{label}: negative dimension in {spec.get('name')!r}")
    return role, dtype, shape


def _header_fields(reader: ArchiveReader) -> tuple[str, str, int | None]:
    """The codec mode, layout and step an archive's header gives, checked."""
    header = reader.header
    try:
        mode, layout, step = header["params"]["mode"], header["layout"], header.get("step")
        if mode not in ("excp", "lossless") or not isinstance(layout, str):
            raise ValueError(f"mode {mode!r}, layout {layout!r}")
        if step is not None:
            _dimension(step)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"{reader.label}: bad archive header ({exc!r})") from None
    return mode, layout, step


def _dimension(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dimension {value!r} is not an integer")
    return value


def read_streams(reader: ArchiveReader, unit: Unit, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.frombuffer(reader.read_stream(unit, name), dtype=torch.uint8).to(device)
            if unit.streams[name]["size"] else torch.empty(0, dtype=torch.uint8, device=device)
            for name in unit.streams}


def decode_archive(reader: ArchiveReader, parent: Reconstruction | None,
                   device: torch.device | str = "cpu", weights_only: bool = False,
                   ) -> tuple[Bundle, Reconstruction]:
    """Decode an archive against ``parent``; returns the bundle and the new
    reconstruction. With ``weights_only`` (walking a chain towards a later step) only
    what the next link needs is decoded.

    The main thread reads and entropy-decodes each unit's streams (file access is
    sequential) while worker threads run the tensor math of the units before it:
    torch and numpy release the GIL, so the two overlap. At most ``2 * DECODE_THREADS``
    units are in flight, so decoded streams never pile up (lossless streams are as
    large as the tensors).
    """
    device = torch.device(device)
    mode, layout, step = _header_fields(reader)
    bundle = Bundle(layout=layout, step=step)
    recon: Reconstruction = {}
    jobs: deque[tuple[list, Future]] = deque()

    def collect() -> None:
        specs, job = jobs.popleft()
        tensors = job.result()
        for (role, _, _), spec in specs:
            bundle.add(TensorEntry(spec["name"], role, tensors[role], spec.get("param")))
            if role is Role.WEIGHT or (mode == "lossless" and role in MOMENT_ROLES):
                recon[spec["name"]] = tensors[role]

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for unit in reader.units:
            label = f"{reader.label}, tensor {unit.name!r}"
            specs = [(tensor_spec(s, label), s) for s in unit.tensors]
            roles = {role for (role, _, _), _ in specs}
            if weights_only and (roles <= {Role.OTHER} or (mode == "excp" and roles <= set(MOMENT_ROLES))):
                continue
            if weights_only and mode == "excp":
                specs = [item for item in specs if item[0][0] is Role.WEIGHT]
            while len(jobs) >= 2 * DECODE_THREADS:
                collect()
            streams = _guarded(label, lambda unit=unit: read_streams(reader, unit, device))
            jobs.append((specs, pool.submit(
                _guarded, label, lambda u=unit, sp=specs, st=streams, lb=label, rs=roles:
                _decode_unit(u, sp, st, parent, device, lb, rs))))
        while jobs:
            collect()
    if not weights_only:
        for name in reader.extras:
            bundle.extras[name] = reader.read_extra(name)
    return bundle, recon


def reconstruction_of(bundle: Bundle, mode: str) -> Reconstruction:
    """What :func:`decode_archive` returned as the reconstruction, taken back from the
    bundle it restored (the same tensors): the weights, and in lossless mode the moments."""
    return {e.name: e.tensor for e in bundle.tensors.values()
            if e.role is Role.WEIGHT or (mode == "lossless" and e.role in MOMENT_ROLES)}


def _guarded(label: str, work: Callable[[], Any]) -> Any:
    """Malformed but checksummed input surfaces as a torch/numpy error: CorruptData."""
    try:
        return work()
    except (RuntimeError, IndexError, ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"{label}: cannot decode ({exc})") from None


def _decode_unit(unit: Unit, specs: list, streams: dict[str, torch.Tensor],
                 parent: Reconstruction | None, device: torch.device,
                 label: str, roles: set[Role]) -> dict[Role, torch.Tensor]:
    """The tensors of ``specs`` (all of the unit's, or only its weight when walking a
    chain); ``roles`` are every tensor the unit holds."""
    enc = Encoded(unit.meta, streams)
    (role, dtype, shape), spec = specs[0]
    if unit.codec == "planes":
        prev = None if parent is None else parent.get(spec["name"])
        if enc.meta.get("xor") and prev is None:
            raise CorruptData(f"{label}: XOR-coded against a parent that was not restored")
        return {role: lossless.decode(enc, dtype, shape, prev)}
    if unit.codec in ("excp", "adam"):
        if unit.codec == "adam":
            adam.check_streams(enc, shape, roles, label)
        else:
            _check_lossy_streams(enc, specs, label)
        prev = None if enc.meta.get("keyframe") or parent is None else parent.get(spec["name"])
        if not enc.meta.get("keyframe") and prev is None:
            raise CorruptData(f"{label}: link has no parent reconstruction")
        dtypes = {role: dtype for (role, dtype, _), _ in specs}
        codec = adam if unit.codec == "adam" else lossy
        return codec.decode_unit(enc, prev, dtypes, shape, device)
    raise CorruptData(f"{label}: unknown codec {unit.codec!r}")


def _check_lossy_streams(enc: Encoded, specs: list, label: str) -> None:
    """Stream sizes must agree with the tensor table before any indexing happens."""
    (_, _, shape), _ = specs[0]
    n = 1
    for d in shape:
        n *= d
    s = enc.streams
    sent = int(enc.meta.get("sent", -1))
    if enc.meta.get("dense"):
        book = s.get("wbook")
        if book is None or book.numel() % 8 != 4 or book.numel() > 4 * (2 * uniform.MAX_LEVEL + 1):
            raise CorruptData(f"{label}: stream 'wbook' is not an odd number of levels")
        expected = {"wcodes": uniform.packed_size(n, (book.numel() // 4 - 1) // 2)}
    else:
        expected = {"mask": -(-n // 8), "wcodes": sent}
    if "mmask" in s:
        expected["mmask"] = -(-sent // 8)
    for name, size in expected.items():
        if name not in s or s[name].numel() != size:
            raise CorruptData(f"{label}: stream {name!r} has the wrong size")
    for key in ("w", "m", "v", "x") if not enc.meta.get("dense") else ("m", "v", "x"):
        codes, book = s.get(f"{key}codes"), s.get(f"{key}book")
        if codes is None:
            continue
        if book is None or book.numel() % 4 or (codes.numel() and int(codes.max()) >= book.numel() // 4):
            raise CorruptData(f"{label}: codes of {key!r} point outside their codebook")
