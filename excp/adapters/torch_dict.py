"""A ``torch.save``d training checkpoint dict: ``{"model": ..., "optimizer": ..., ...}``.

This is also the in-memory form the training-loop hook hands over, so ``to_bundle``
and ``from_bundle`` never copy, clone or move a tensor: the bundle holds the live
tensors on their devices, and the dict rebuilt from a bundle holds the bundle's.

Besides ``model``/``optimizer``, the names of PyTorch's tutorial
(``model_state_dict``/``optimizer_state_dict``) and of Lightning (``state_dict``,
``optimizer_states`` as a list) are recognized, since those are the same checkpoint
under other keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from excp.adapters import assemble
from excp.adapters.files import save_torch, staged_file
from excp.adapters.skeleton import Path as ObjectPath
from excp.bundle import Bundle
from excp.errors import InvalidInput

LAYOUT = "torch_dict"
MODEL_KEYS = ("model", "model_state_dict", "state_dict")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
OPTIMIZER_LIST_KEY = "optimizer_states"


def model_key(obj: Any) -> str | None:
    """The key of the model state dict if ``obj`` is a training checkpoint dict."""
    if not isinstance(obj, dict):
        return None
    for key in MODEL_KEYS:
        value = obj.get(key)
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return key
    return None


STEP_KEYS = ("step", "global_step", "iteration")


def to_bundle(obj: dict, *, param_order: Sequence[str] | None = None) -> Bundle:
    """The bundle of a checkpoint dict, sharing its tensors.

    ``param_order`` (``[n for n, _ in model.named_parameters()]``) helps pair an
    optimizer built from ``model.parameters()``; without it the state dict's order is
    used, which also holds buffers.
    """
    key = model_key(obj)
    if key is None:
        raise InvalidInput(
            f"a checkpoint dict needs a model state dict under one of {list(MODEL_KEYS)}; "
            "store model.state_dict() under 'model'"
        )
    model = obj[key]
    order = list(param_order) if param_order is not None else list(model)
    bundle = assemble.to_bundle(LAYOUT, obj, [(key,)], _optimizer_paths(obj), order=order)
    bundle.step = _declared_step(obj)
    return bundle


def _declared_step(obj: dict) -> int | None:
    """The step the dict says it was saved at (``step``/``global_step``), if an int."""
    for key in STEP_KEYS:
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def from_bundle(bundle: Bundle) -> dict:
    """The checkpoint dict, holding the bundle's tensors themselves."""
    return assemble.from_bundle(bundle, LAYOUT)


def save(bundle: Bundle, out: Path) -> Path:
    """Write the checkpoint dict with ``torch.save``, tensors on the CPU so it loads anywhere."""
    obj = assemble.from_bundle(bundle, LAYOUT, convert=lambda t: t.cpu())
    with staged_file(out) as tmp:
        save_torch(obj, tmp)
    return out


def optimizer_states(obj: dict) -> list[dict]:
    """The optimizer state dicts the checkpoint holds, in the order they are paired."""
    states = [obj[path[0]] if len(path) == 1 else obj[path[0]][path[1]] for path in _optimizer_paths(obj)]
    return [state for state in states if isinstance(state, dict)]


def _optimizer_paths(obj: dict) -> list[ObjectPath]:
    paths: list[ObjectPath] = [(key,) for key in OPTIMIZER_KEYS if obj.get(key) is not None]
    states = obj.get(OPTIMIZER_LIST_KEY)
    if isinstance(states, list):
        paths += [(OPTIMIZER_LIST_KEY, i) for i in range(len(states))]
    return paths
