"""Split a nested checkpoint object into tensor entries and a tensor-free skeleton, and back.

Everything in a checkpoint that is not a tensor (param_groups, step counters, scheduler
state, RNG states, user metadata) must come back bit-exact, yet only adapters may know
what it means. So it is not interpreted at all: the skeleton is the original object
with every tensor replaced by None, saved with ``torch.save`` and read back with
``weights_only=True`` (never a plain unpickler). It also records the path (dict keys
and list indices from the root) at which each tensor sat and the entry it became, so
restore puts tensors back without re-deriving the layout. Since every tensor becomes an
entry, the skeleton holds no device-bound data and restores on any machine.

Aliasing: tensors that view the same memory (same device, data pointer, dtype, shape
and strides, as tied embeddings are in a state dict, or one tensor object stored twice)
become one entry, and every path that held one of them refers to it, so restore puts
the same tensor object at each place and ``torch.save`` writes it once, as the original
file did. Partial overlaps (one tensor a slice of another) are not detected: those come
back as independent copies with the same values.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import torch

from excp.adapters.files import first_line
from excp.bundle import Role, TensorEntry
from excp.errors import CorruptData, InvalidInput

Path = tuple[Hashable, ...]

_VERSION = 1


class Claim(NamedTuple):
    """The entry an adapter wants for the tensor at a path (others get path names)."""

    name: str
    role: Role
    param: str | None = None


def alias_key(tensor: torch.Tensor) -> Hashable:
    """Equal for two tensors exactly when they view the same memory the same way."""
    if tensor.layout != torch.strided or tensor.numel() == 0 or tensor.device.type == "meta":
        return ("object", id(tensor))
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def get_path(obj: Any, path: Path) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def split(obj: Any, claims: Mapping[Path, Claim]) -> tuple[list[TensorEntry], bytes]:
    """Every tensor of ``obj`` as a bundle entry, and the skeleton that places them.

    A claimed path gets its claim's name and role; other tensors become ``other``
    entries named by their path (``optimizer/state/3/step``). Among aliases the entry
    takes the first non-``other`` claim, so a tied weight stays a weight.
    """
    found: list[tuple[Path, torch.Tensor]] = []
    stripped = _strip(obj, (), {}, found)
    found.sort(key=lambda item: _rank(claims.get(item[0])))
    taken = {claim.name for claim in claims.values()}
    entries: dict[Hashable, TensorEntry] = {}
    refs = []
    for path, tensor in found:
        key = alias_key(tensor)
        entry = entries.get(key)
        if entry is None:
            claim = claims.get(path) or Claim(_fresh_name(path, taken), Role.OTHER)
            entry = TensorEntry(claim.name, claim.role, tensor, claim.param)
            entries[key] = entry
        refs.append((path, entry.name))
    specs = {e.name: (list(e.tensor.shape), str(e.tensor.dtype)) for e in entries.values()}
    payload = {"version": _VERSION, "object": stripped, "refs": refs, "specs": specs}
    try:
        blob = _dumps(payload)
        _loads(blob)
    except Exception as exc:
        raise InvalidInput(
            f"the checkpoint holds an object that cannot be stored safely ({first_line(exc)}); "
            "keep only tensors, numbers, strings, lists, tuples and dicts in it"
        ) from exc
    return list(entries.values()), blob


def join(blob: bytes, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The original object, with ``tensors`` (by entry name) put back where they were."""
    try:
        payload = _loads(blob)
    except Exception as exc:
        raise CorruptData(f"checkpoint skeleton cannot be read: {first_line(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("version") != _VERSION:
        raise CorruptData("checkpoint skeleton has an unknown version; upgrade excp")
    for name, (shape, dtype) in payload["specs"].items():
        tensor = tensors.get(name)
        if tensor is None:
            raise CorruptData(f"bundle lacks tensor {name!r} that the checkpoint needs")
        if list(tensor.shape) != shape or str(tensor.dtype) != dtype:
            raise CorruptData(
                f"tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, "
                f"the checkpoint needs {shape} {dtype}"
            )
    obj = payload["object"]
    for path, name in payload["refs"]:
        obj = _put(obj, tuple(path), tensors[name])
    return obj


def _rank(claim: Claim | None) -> int:
    if claim is None:
        return 2
    return 1 if claim.role is Role.OTHER else 0


def _fresh_name(path: Path, taken: set[str]) -> str:
    base = "/".join(str(key) for key in path)
    name = base
    n = 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    taken.add(name)
    return name


def _strip(obj: Any, path: Path, memo: dict[int, Any], found: list) -> Any:
    """A copy of ``obj`` with tensors replaced by None; shared containers stay shared."""
    if isinstance(obj, torch.Tensor):
        found.append((path, obj))
        return None
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)
        memo[id(obj)] = out
        for key, value in obj.items():
            out[key] = _strip(value, (*path, key), memo, found)
        return out
    if isinstance(obj, list):
        items: list = []
        memo[id(obj)] = items
        items.extend(_strip(v, (*path, i), memo, found) for i, v in enumerate(obj))
        return items
    if type(obj) is tuple:
        stripped = tuple(_strip(v, (*path, i), memo, found) for i, v in enumerate(obj))
        memo[id(obj)] = stripped
        return stripped
    return obj


def _put(obj: Any, path: Path, value: Any) -> Any:
    """Set ``obj[path] = value``, rebuilding tuples on the way; returns the new root."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    child = _put(obj[key], rest, value)
    if isinstance(obj, tuple):
        return (*obj[:key], child, *obj[key + 1 :])
    obj[key] = child
    return obj


def _dumps(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _loads(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
