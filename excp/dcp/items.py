"""One rank's share of a DCP save as a :class:`~excp.bundle.Bundle`, and back.

DCP hands a rank *write items*: chunks of tensors (a whole tensor, or the shard of a
DTensor at some offsets) named by their flattened fully qualified name, and
serialized objects (``BYTE_IO``: param groups, counters, anything not a tensor). Each
chunk becomes a tensor entry named ``<fqn>|<offsets>``; each object an extra, kept
byte for byte.

Adam's moments are paired with their weights by name, never by position: with
``get_state_dict(model, optimizer)`` the optimizer's state is keyed by the parameter's
FQN, so after DCP flattens the state dict the moment of ``layer.weight`` is
``<opt>.state.layer.weight.exp_avg`` and its weight is ``<model>.layer.weight`` — the
one tensor chunk whose FQN ends in ``.layer.weight`` (or is it) at the same offsets.
Two such candidates are an error, not a guess. A float chunk is coded as a weight when
a moment pairs with it, or — in a save with no optimizer state on this rank — always;
every other chunk (buffers, frozen parameters, step counters, integer tensors) is
stored bit-exact.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType

from excp.bundle import FLOAT_DTYPES, Bundle, Role, TensorEntry, moment_name
from excp.errors import InvalidInput

LAYOUT = "dcp_shard"
_MOMENT = re.compile(r"(?:^|.*\.)state\.(?P<param>.+)\.(?P<moment>exp_avg|exp_avg_sq|max_exp_avg_sq)")
_GROUP = re.compile(r"(?P<group>(?:.*\.)?param_groups\.\d+)\.(?P<field>[^.]+)")
_ROLES = {"exp_avg": Role.EXP_AVG, "exp_avg_sq": Role.EXP_AVG_SQ, "max_exp_avg_sq": Role.MAX_EXP_AVG_SQ}


def entry_name(index: MetadataIndex) -> str:
    """The bundle name of a write item: its FQN and, for a chunk, its offsets."""
    offsets = "" if index.offset is None else ",".join(str(int(o)) for o in index.offset)
    return f"{index.fqn}|{offsets}"


def to_bundle(items: Iterable[WriteItem], planner: SavePlanner, step: int
              ) -> tuple[Bundle, dict[MetadataIndex, str]]:
    """This rank's items, resolved through the planner (tensors stay on their device),
    and the name each item is stored under in the bundle (a tensor entry or an extra)."""
    chunks: dict[str, tuple[str, str, torch.Tensor]] = {}
    bundle = Bundle(LAYOUT, step=step)
    stored: dict[MetadataIndex, str] = {}
    for item in items:
        name = entry_name(item.index)
        stored[item.index] = name
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            bundle.extras[name] = data.getvalue()
        else:
            offsets = name.rsplit("|", 1)[1]
            chunks[name] = (item.index.fqn, offsets, data.detach())
    moments = {name: match for name, (fqn, _, _) in chunks.items() if (match := _MOMENT.fullmatch(fqn))}
    weights: dict[str, str] = {}  # moment entry -> weight entry
    for name, match in moments.items():
        weight = _weight_of(match.group("param"), chunks[name], chunks, moments)
        if weight is not None:
            weights[name] = weight
    paired = set(weights.values())
    renamed: dict[str, str] = {}
    for name, (_, _, tensor) in chunks.items():
        floating = tensor.dtype in FLOAT_DTYPES
        is_weight = floating and name not in moments and (name in paired or not moments)
        if is_weight:
            bundle.add(TensorEntry(name, Role.WEIGHT, tensor))
    for name, (_, _, tensor) in chunks.items():
        if name in bundle.tensors:
            continue
        weight = weights.get(name)
        if weight is not None:
            role = _ROLES[moments[name].group("moment")]
            bundle.add(TensorEntry(moment_name(weight, role), role, tensor, param=weight))
            renamed[name] = moment_name(weight, role)
        else:
            bundle.add(TensorEntry(name, Role.OTHER, tensor))
    owners = {moments[name].group("param"): weight for name, weight in weights.items()}
    bundle.lr = _learning_rates(bundle.extras, owners)
    return bundle, {index: renamed.get(name, name) for index, name in stored.items()}


def _learning_rates(extras: dict[str, bytes], owners: dict[str, str]) -> dict[str, float]:
    """Each weight's learning rate, from the param groups DCP saved as objects
    (``<opt>.param_groups.<g>.lr`` and ``.params``, the FQNs of the group); ``owners``
    maps a parameter FQN to its weight entry on this rank."""
    groups: dict[str, dict[str, object]] = {}
    for name, data in extras.items():
        match = _GROUP.fullmatch(name.rsplit("|", 1)[0])
        if match and match.group("field") in ("lr", "params"):
            try:
                value = torch.load(io.BytesIO(data), weights_only=True)
            except Exception:  # noqa: BLE001 - an unreadable object is simply not a learning rate
                continue
            groups.setdefault(match.group("group"), {})[match.group("field")] = value
    rates: dict[str, float] = {}
    for group in groups.values():
        lr, params = group.get("lr"), group.get("params")
        if isinstance(lr, int | float) and not isinstance(lr, bool) and isinstance(params, list):
            for param in params:
                if isinstance(param, str) and param in owners:
                    rates[owners[param]] = float(lr)
    return rates


def _weight_of(param: str, moment: tuple[str, str, torch.Tensor],
               chunks: dict[str, tuple[str, str, torch.Tensor]], moments: dict) -> str | None:
    """The weight chunk a moment chunk belongs to, if it is on this rank."""
    fqn, offsets, tensor = moment
    if tensor.dtype not in FLOAT_DTYPES:
        return None
    candidates = {name for name, (other, at, _) in chunks.items() if name not in moments
                  and at == offsets and (other == param or other.endswith("." + param))}
    if len(candidates) > 1:
        raise InvalidInput(f"optimizer state {fqn!r} fits several tensors ({', '.join(sorted(candidates))}); "
                           "save the state dict of get_state_dict(model, optimizer) under distinct keys")
    if not candidates:
        return None
    weight = candidates.pop()
    same = chunks[weight][2].shape == tensor.shape and chunks[weight][2].dtype in FLOAT_DTYPES
    return weight if same else None
