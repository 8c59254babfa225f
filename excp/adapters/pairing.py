"""Which model tensor each optimizer slot belongs to.

A torch optimizer's state dict knows its parameters only by integer index. To code a
moment against its weight, excp must know which model tensor each index is, and a
wrong guess is silent: the moments of ``q_proj`` land on ``k_proj`` and training
resumes on corrupted Adam state. The reference implementation hard-coded one model's
parameter list. Here the answer comes from evidence, and anything short of a unique
answer is an error:

1. ``param_names`` recorded by torch (optimizer built from ``named_parameters()``):
   used as they are once every name and shape checks out.
2. Otherwise position: each param group lists its parameters in model order, so each
   group is an order-preserving subsequence of the model's floating tensors whose
   shapes match the slots' ``exp_avg`` shapes. The leftmost and rightmost greedy
   embeddings bound every possible embedding slot by slot, so where they agree the
   slot is forced, and where they differ two valid answers exist. Positions forced in
   one group are taken away from the others until nothing changes (sound, so a
   unique result is the only one).
3. When position alone is ambiguous, two documented conventions may break the tie,
   and still only a unique answer is accepted: Hugging Face Trainer's two groups
   (weight decay, then no decay for biases and norms), and torch's own BatchNorm
   buffers (``running_mean``, ``running_var``), which are never parameters.

Everything here works on names and shapes only, so it is testable without tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from excp.errors import InvalidInput

Shape = tuple[int, ...]

DEFAULT_FIX = (
    "build the optimizer from model.named_parameters() so torch records param_names, "
    "or pass param_order=[n for n, _ in model.named_parameters()]"
)

# Hugging Face Trainer puts biases and the weights of norm layers in its no-decay group.
# transformers decides by module type (nn.LayerNorm) plus the name patterns "bias",
# "layernorm", "rmsnorm", "(^|.)norm(.|$)" and "_norm(.|$)"; module types are not in a
# checkpoint, so the common names of LayerNorm modules (ln_1, ln_f, norm1, layer_norm)
# stand in for them.
_NO_DECAY = re.compile(
    r"bias|layer_?norm|rms_?norm"
    r"|(?:^|[._])norm(?:\d+|_f)?(?:$|\.)"
    r"|(?:^|[._])ln(?:\d+|_\w+)?(?:$|\.)"
)
_RUNNING_STATS = re.compile(r"(?:^|\.)running_(?:mean|var)$")


@dataclass(frozen=True)
class Param:
    """A floating-point model tensor that an optimizer slot may belong to."""

    name: str
    shape: Shape


@dataclass(frozen=True)
class Group:
    """One optimizer param group: its slots in the optimizer's order.

    ``shapes[j]`` is the shape of slot j's ``exp_avg``, or None when the slot has no
    state (no gradient yet): such a slot still occupies a model tensor but needs no
    pairing of its own. ``indices`` are the optimizer's integer ids, for messages.
    """

    indices: Sequence[int]
    shapes: Sequence[Shape | None]
    names: Sequence[str] | None = None
    where: str = "optimizer"


def is_no_decay(name: str) -> bool:
    """Whether Hugging Face Trainer would put parameter ``name`` in its no-decay group."""
    return _NO_DECAY.search(name.lower()) is not None


def pair(
    params: Sequence[Param],
    groups: Sequence[Group],
    *,
    ordered: bool = True,
    fix: str = DEFAULT_FIX,
) -> list[list[str | None]]:
    """The model tensor name of every slot that has state (None for slots without).

    ``params`` are the model's floating tensors, aliases removed, in model order when
    ``ordered`` (otherwise only ``param_names`` can pair). Raises InvalidInput, ending
    in ``fix``, when the pairing is impossible or not unique.
    """
    problem = ""
    if groups and all(g.names is not None for g in groups):
        result, problem = _by_names(params, groups)
        if result is not None:
            return result
    if not ordered:
        reason = problem or "the optimizer records no param_names"
        raise InvalidInput(
            f"cannot pair optimizer state with model tensors: {reason}, and the model's "
            f"parameter order is unknown; {fix}"
        )
    first_error = ""
    for allowed in _hypotheses(params, len(groups)):
        result, error = _solve(params, groups, allowed)
        if result is not None:
            return result
        first_error = first_error or error
    if problem:
        first_error = f"{problem}; by position: {first_error}"
    raise InvalidInput(f"{first_error}; {fix}")


def _describe(group: Group, slot: int) -> str:
    shape = group.shapes[slot]
    state = f"exp_avg shape {list(shape)}" if shape is not None else "no state"
    return f"{group.where} param {group.indices[slot]} ({state})"


def _by_names(params: Sequence[Param], groups: Sequence[Group]) -> tuple[list[list[str | None]] | None, str]:
    by_name = {p.name: p for p in params}
    seen: set[str] = set()
    result = []
    for group in groups:
        names = group.names or ()
        if len(names) != len(group.shapes):
            count = f"{len(names)} param_names for {len(group.shapes)} params"
            return None, f"{group.where} has {count}"
        row: list[str | None] = []
        for slot, (name, shape) in enumerate(zip(names, group.shapes, strict=True)):
            param = by_name.get(name)
            if param is None:
                return None, (
                    f"param_names entry {name!r} of {_describe(group, slot)} is not a "
                    "floating-point tensor of the model"
                )
            if shape is not None and shape != param.shape:
                return None, (
                    f"param_names entry {name!r} has shape {list(param.shape)} in the model "
                    f"but {_describe(group, slot)}"
                )
            if name in seen:
                return None, f"param_names lists {name!r} twice"
            seen.add(name)
            row.append(name if shape is not None else None)
        result.append(row)
    return result, ""


def _hypotheses(params: Sequence[Param], n_groups: int) -> Iterator[list[list[int]]]:
    """Candidate positions allowed per group: plain position first, then the tie-breakers."""
    has_stats = any(_RUNNING_STATS.search(p.name) for p in params)
    for drop_stats in (False, True) if has_stats else (False,):
        for hf_rule in (False, True) if n_groups == 2 else (False,):
            yield [
                [
                    i
                    for i, p in enumerate(params)
                    if not (drop_stats and _RUNNING_STATS.search(p.name))
                    and (not hf_rule or is_no_decay(p.name) == (g == 1))
                ]
                for g in range(n_groups)
            ]


def _solve(
    params: Sequence[Param], groups: Sequence[Group], allowed: Sequence[Sequence[int]]
) -> tuple[list[list[str | None]] | None, str]:
    claimed: dict[int, int] = {}
    spans: list[tuple[list[int], list[int]]] = []
    changed = True
    while changed:
        changed = False
        spans = []
        for g, group in enumerate(groups):
            avail = [i for i in allowed[g] if claimed.get(i, g) == g]
            low = _leftmost(group.shapes, params, avail)
            if isinstance(low, int):
                return None, (
                    f"cannot pair {_describe(group, low)} with a model tensor: no tensor of "
                    "that shape is left at its place in model order"
                )
            high = _rightmost(group.shapes, params, avail)
            spans.append((low, high))
            for a, b in zip(low, high, strict=True):
                if a == b and a not in claimed:
                    claimed[a] = g
                    changed = True
    for group, (low, high) in zip(groups, spans, strict=True):
        for slot, shape in enumerate(group.shapes):
            if shape is not None and low[slot] != high[slot]:
                return None, (
                    f"cannot pair {_describe(group, slot)}: it could be "
                    f"{params[low[slot]].name!r} or {params[high[slot]].name!r}"
                )
    result = [
        [params[pos].name if shape is not None else None for pos, shape in zip(low, g.shapes, strict=True)]
        for g, (low, _) in zip(groups, spans, strict=True)
    ]
    return result, ""


def _leftmost(
    shapes: Sequence[Shape | None], params: Sequence[Param], avail: Sequence[int]
) -> list[int] | int:
    """The leftmost embedding of ``shapes`` into ``avail``, or the first slot that fits nowhere."""
    out = []
    k = 0
    for slot, shape in enumerate(shapes):
        while k < len(avail) and shape is not None and params[avail[k]].shape != shape:
            k += 1
        if k == len(avail):
            return slot
        out.append(avail[k])
        k += 1
    return out


def _rightmost(shapes: Sequence[Shape | None], params: Sequence[Param], avail: Sequence[int]) -> list[int]:
    """Called only when a leftmost embedding exists, so a rightmost one exists too."""
    mirrored = _leftmost(shapes[::-1], params, avail[::-1])
    assert not isinstance(mirrored, int)
    return mirrored[::-1]
