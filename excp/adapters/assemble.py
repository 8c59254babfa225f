"""Give the tensors of a loaded checkpoint object their roles, and build the object back.

The layout adapters only say where in the object the model state dict(s) and the
optimizer state dict(s) live; the rules for roles are the same for all of them:

* a floating model tensor paired with Adam state (``exp_avg`` and ``exp_avg_sq``) is a
  ``weight`` and its moments are named ``<weight>@exp_avg`` etc.;
* with no optimizer at all (weights-only input) every floating model tensor is a
  ``weight``; with an optimizer, floating tensors it has no Adam state for (buffers,
  frozen parameters, parameters without a gradient yet) are ``other``;
* everything else (integer tensors, ``step`` counters, RNG states) is ``other``, named
  by its path, and non-tensors stay in the skeleton (see ``skeleton``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from excp.adapters import pairing, skeleton
from excp.adapters.skeleton import Claim, Path
from excp.bundle import MOMENT_ROLES, Bundle, Role, moment_name
from excp.errors import CorruptData, InvalidInput


def to_bundle(
    layout: str,
    obj: Any,
    models: Sequence[Path],
    optimizers: Sequence[Path],
    *,
    order: Sequence[str] | None,
    fix: str = pairing.DEFAULT_FIX,
) -> Bundle:
    """The bundle of ``obj``, whose model state dicts sit at ``models`` and optimizer
    state dicts at ``optimizers``.

    ``order`` lists model tensor names in parameter order (``named_parameters()`` or
    state-dict order) for positional pairing; None when the source does not record it,
    which leaves only ``param_names`` to pair by, and ``fix`` says how to supply it.
    """
    model = _model_tensors(obj, models)
    canonical: dict[str, str] = {}
    first_name: dict[object, str] = {}
    for name, (_, tensor) in model.items():
        if tensor.is_floating_point():
            canonical[name] = first_name.setdefault(skeleton.alias_key(tensor), name)
    states = [_optimizer(obj, path) for path in optimizers]
    paired = _pair(states, optimizers, model, canonical, order, fix)

    claims: dict[Path, Claim] = {}
    weights = set(paired.values())
    for name, (path, _) in model.items():
        is_weight = name in weights or (not optimizers and canonical.get(name) == name)
        claims[path] = Claim(name, Role.WEIGHT if is_weight else Role.OTHER)
    for (k, index), param in paired.items():
        state = states[k]["state"][index]
        for role in MOMENT_ROLES:
            if isinstance(state.get(role.value), torch.Tensor):
                path = (*optimizers[k], "state", index, role.value)
                claims[path] = Claim(moment_name(param, role), role, param)

    entries, blob = skeleton.split(obj, claims)
    bundle = Bundle(layout=layout, lr=_learning_rates(states, paired))
    for entry in entries:
        bundle.add(entry)
    bundle.extras[skeleton_key(layout)] = blob
    return bundle


def _learning_rates(states: Sequence[dict], paired: dict[tuple[int, int], str]) -> dict[str, float]:
    """Each paired weight's learning rate: its param group's ``lr`` (a number, or a
    one-element tensor as capturable optimizers keep it), where it has one."""
    rates: dict[str, float] = {}
    for k, state in enumerate(states):
        for group in state["param_groups"]:
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor) and lr.numel() == 1:
                lr = float(lr)
            if isinstance(lr, bool) or not isinstance(lr, int | float):
                continue
            for index in group["params"]:
                name = paired.get((k, index))
                if name is not None:
                    rates[name] = float(lr)
    return rates


def from_bundle(
    bundle: Bundle, layout: str, convert: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Any:
    """The object ``to_bundle`` was given, with the bundle's tensors (through ``convert``,
    applied once per entry so aliases stay aliases)."""
    if bundle.layout != layout:
        raise InvalidInput(f"bundle has layout {bundle.layout!r}, not {layout!r}")
    blob = bundle.extras.get(skeleton_key(layout))
    if blob is None:
        raise CorruptData(f"bundle lacks extra {skeleton_key(layout)!r}; it cannot be restored")
    tensors = {name: convert(e.tensor) if convert else e.tensor for name, e in bundle.tensors.items()}
    return skeleton.join(blob, tensors)


def skeleton_key(layout: str) -> str:
    return f"{layout}/skeleton"


def is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in value["param_groups"])
    )


def _model_tensors(obj: Any, models: Sequence[Path]) -> dict[str, tuple[Path, torch.Tensor]]:
    found: dict[str, tuple[Path, torch.Tensor]] = {}
    for path in models:
        for key, value in skeleton.get_path(obj, path).items():
            if not isinstance(value, torch.Tensor):
                continue
            if not isinstance(key, str):
                raise InvalidInput(f"model state dict key {key!r} is not a string")
            if key in found:
                raise InvalidInput(f"model tensor {key!r} appears in more than one weight file")
            found[key] = ((*path, key), value)
    return found


def _optimizer(obj: Any, path: Path) -> dict:
    value = skeleton.get_path(obj, path)
    if not is_optimizer_state(value):
        where = "/".join(map(str, path))
        raise InvalidInput(
            f"{where!r} is not an optimizer state_dict (a dict with 'state' and 'param_groups'); "
            "store optimizer.state_dict() there"
        )
    return value


def _adam_shape(state: Any) -> tuple[int, ...] | None:
    """The shape of a slot's Adam moments, or None if it has no Adam state to pair."""
    if not isinstance(state, dict):
        return None
    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
    if not (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    if not (m.is_floating_point() and v.is_floating_point()) or m.shape != v.shape:
        return None
    return tuple(m.shape)


def _pair(
    states: Sequence[dict],
    paths: Sequence[Path],
    model: dict[str, tuple[Path, torch.Tensor]],
    canonical: dict[str, str],
    order: Sequence[str] | None,
    fix: str,
) -> dict[tuple[int, int], str]:
    """(optimizer number, param index) -> model tensor name, for every slot with Adam state."""
    groups: list[pairing.Group] = []
    owners: list[int] = []
    for k, (state, path) in enumerate(zip(states, paths, strict=True)):
        where = "/".join(map(str, path))
        for group in state["param_groups"]:
            indices = group["params"]
            recorded = group.get("param_names")
            groups.append(
                pairing.Group(
                    indices=indices,
                    shapes=[_adam_shape(state["state"].get(i)) for i in indices],
                    names=[canonical.get(n, n) for n in recorded] if recorded is not None else None,
                    where=where,
                )
            )
            owners.append(k)
    if not any(shape is not None for g in groups for shape in g.shapes):
        return {}
    # Names missing from the model (a tied duplicate a weight file left out) are skipped.
    ordered_names = dict.fromkeys(
        canonical[n] for n in (order if order is not None else model) if n in canonical
    )
    params = [pairing.Param(n, tuple(model[n][1].shape)) for n in ordered_names]
    result = pairing.pair(params, groups, ordered=order is not None, fix=fix)
    paired = {}
    for k, group, row in zip(owners, groups, result, strict=True):
        for index, name in zip(group.indices, row, strict=True):
            if name is not None:
                paired[(k, index)] = name
    return paired
