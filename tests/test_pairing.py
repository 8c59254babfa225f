"""Pairing optimizer slots with model tensors, on names and shapes alone."""

from __future__ import annotations

import pytest

from excp.adapters.pairing import Group, Param, is_no_decay, pair
from excp.errors import InvalidInput

D = 4


def params(*items: tuple[str, tuple[int, ...]]) -> list[Param]:
    return [Param(name, shape) for name, shape in items]


def group(*shapes: tuple[int, ...] | None, names: list[str] | None = None) -> Group:
    return Group(indices=list(range(len(shapes))), shapes=list(shapes), names=names)


def test_single_group_skips_buffers_and_frozen_tensors_of_other_shapes() -> None:
    model = params(("emb", (9, D)), ("scale", (7,)), ("lin.weight", (D, D)), ("lin.bias", (D,)))
    assert pair(model, [group((9, D), (D, D), (D,))]) == [["emb", "lin.weight", "lin.bias"]]


def test_ambiguous_position_names_the_slot_and_both_candidates() -> None:
    model = params(("a", (D,)), ("frozen", (D,)), ("c", (D,)))
    with pytest.raises(InvalidInput) as info:
        pair(model, [group((D,), (D,))])
    message = info.value.message
    assert "optimizer param 0" in message and "'a' or 'frozen'" in message
    assert "named_parameters()" in message and "\n" not in message


def test_no_match_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="optimizer param 1 .*shape \\[3\\]"):
        pair(params(("a", (D,)), ("b", (D,))), [group((D,), (3,))])


def test_slots_without_state_occupy_a_tensor_but_need_no_unique_place() -> None:
    # The stateless slot could be "b" or "c"; either way "a" and "d" are forced.
    model = params(("a", (D, D)), ("b", (D,)), ("c", (D,)), ("d", (2, D)))
    assert pair(model, [group((D, D), None, (2, D))]) == [["a", None, "d"]]


def test_too_many_stateless_slots_still_fail() -> None:
    with pytest.raises(InvalidInput, match="no state"):
        pair(params(("a", (D,)), ("b", (D,))), [group((D,), None, None)])


def test_param_names_win_over_position() -> None:
    model = params(("a", (D,)), ("frozen", (D,)), ("c", (D,)))
    got = pair(model, [group((D,), (D,), names=["a", "c"])], ordered=False)
    assert got == [["a", "c"]]


def test_bad_param_names_fall_back_to_position_when_order_is_known() -> None:
    model = params(("w", (D, D)), ("b", (D,)))
    got = pair(model, [group((D, D), (D,), names=["module.w", "module.b"])])
    assert got == [["w", "b"]]


def test_param_names_with_a_wrong_shape_are_not_trusted() -> None:
    model = params(("w", (D, D)), ("b", (D,)))
    with pytest.raises(InvalidInput, match="'b' has shape \\[4\\] in the model"):
        pair(model, [group((D, D), (3,), names=["w", "b"])])


def test_unknown_order_without_param_names_is_refused_with_the_callers_fix() -> None:
    with pytest.raises(InvalidInput, match="order is unknown; do this"):
        pair(params(("w", (D, D))), [group((D, D))], ordered=False, fix="do this")


def test_groups_out_of_model_order_are_matched_per_group() -> None:
    # Group 0 holds the head (last in the model), group 1 the body.
    model = params(("body.w", (D, D)), ("body.b", (D,)), ("head.w", (2, D)), ("head.b", (2,)))
    got = pair(model, [group((2, D), (2,)), group((D, D), (D,))])
    assert got == [["head.w", "head.b"], ["body.w", "body.b"]]


def test_positions_forced_in_one_group_are_taken_from_the_others() -> None:
    # Alone, group 1's slot could be "x" or "y"; group 0 is forced onto "x".
    model = params(("x", (D,)), ("m", (3, D)), ("y", (D,)))
    got = pair(model, [group((D,), (3, D)), group((D,))])
    assert got == [["x", "m"], ["y"]]


def gpt_block(prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.ln_1.weight", (D,)),
        (f"{prefix}.ln_1.bias", (D,)),
        (f"{prefix}.attn.weight", (3 * D, D)),
        (f"{prefix}.attn.bias", (3 * D,)),
        (f"{prefix}.proj.weight", (D, D)),
        (f"{prefix}.proj.bias", (D,)),
    ]


def trainer_groups(model: list[Param]) -> list[Group]:
    decay = [p for p in model if not is_no_decay(p.name) and p.name != "scale"]
    no_decay = [p for p in model if is_no_decay(p.name)]
    return [
        Group(indices=list(range(len(decay))), shapes=[p.shape for p in decay]),
        Group(indices=list(range(len(decay), len(model))), shapes=[p.shape for p in no_decay]),
    ]


def test_trainer_decay_rule_breaks_a_tie_position_cannot() -> None:
    # A float buffer of the norms' shape sits before the first block: by position
    # alone ln_1.weight could be the buffer; the no-decay rule excludes it.
    model = params(("scale", (D,)), ("wte", (9, D)), *gpt_block("h.0"), *gpt_block("h.1"))
    groups = trainer_groups(model)
    got = pair(model, groups)
    assert got[0] == [p.name for p in model if not is_no_decay(p.name) and p.name != "scale"]
    assert got[1] == [p.name for p in model if is_no_decay(p.name)]


def test_wrong_decay_rule_is_not_needed_when_position_is_unique() -> None:
    # "gamma" is a norm weight the rule does not recognize; with no competing
    # tensor of its shape, position alone pairs it in the no-decay group.
    model = params(("w", (D, D)), ("gamma", (3,)), ("b", (D,)))
    got = pair(model, [group((D, D)), group((3,), (D,))])
    assert got == [["w"], ["gamma", "b"]]


def test_batchnorm_running_stats_are_never_parameters() -> None:
    model = params(
        ("0.weight", (D, 3)),
        ("0.bias", (D,)),
        ("1.weight", (D,)),
        ("1.bias", (D,)),
        ("1.running_mean", (D,)),
        ("1.running_var", (D,)),
        ("3.weight", (2, D)),
    )
    got = pair(model, [group((D, 3), (D,), (D,), (D,), (2, D))])
    assert got == [["0.weight", "0.bias", "1.weight", "1.bias", "3.weight"]]


@pytest.mark.parametrize(
    "name",
    [
        "transformer.h.0.ln_1.weight",
        "transformer.ln_f.bias",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight",
        "model.norm.weight",
        "bert.encoder.layer.0.output.LayerNorm.weight",
        "encoder.block.0.layer.1.layer_norm.weight",
        "blocks.2.norm1.weight",
        "h.0.attn.c_attn.bias",
    ],
)
def test_no_decay_names(name: str) -> None:
    assert is_no_decay(name)


@pytest.mark.parametrize(
    "name",
    [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_proj.weight",
        "model.layers.3.mlp.gate_proj.weight",
        "lm_head.weight",
        "kiln.weight",
        "normalizer.weight",
    ],
)
def test_decay_names(name: str) -> None:
    assert not is_no_decay(name)
