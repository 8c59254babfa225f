"""Checkpoints to bundles and back: roles, pairing, bit-exact extras, safe loading."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import random
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from excp.adapters import load_checkpoint, save_checkpoint, state_dict, torch_dict
from excp.bundle import Bundle, Role, moment_name
from excp.errors import CorruptData, InvalidInput, NotFound

D, VOCAB, CONTEXT = 8, 11, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """The models here are tiny: intra-op threads only add contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln_2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn(self.ln_1(x)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
        x = x + self.proj(weights @ v)
        return x + self.out(torch.relu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """LayerNorms, biases, a tied embedding and a float buffer shaped like the norms."""

    def __init__(self, config: object = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(D))
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(CONTEXT, D)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x) * self.scale)


class Exploit:
    """Unpickling this runs os.mkdir: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (2, CONTEXT), generator=generator)
        loss = model(idx).float().logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested checkpoint objects, types and key order included."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_paired(bundle: Bundle, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter with Adam state is a weight whose moments are its own."""
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        if "exp_avg" not in state:
            assert bundle.tensors[name].role is Role.OTHER, name
            assert not bundle.moments(name), name
            continue
        assert bundle.tensors[name].role is Role.WEIGHT, name
        moments = bundle.moments(name)
        expected = [r for r in (Role.EXP_AVG, Role.EXP_AVG_SQ, Role.MAX_EXP_AVG_SQ) if r.value in state]
        assert sorted(moments) == sorted(expected), name
        for role, entry in moments.items():
            assert entry.param == name and entry.role is role
            assert torch.equal(entry.tensor, state[role.value]), name


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
}


def training_checkpoint(make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> tuple:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train(model, optimizer)
    scheduler.step()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "python": random.getstate()},
        "step": 3,
        "meta": {"run": "tiny", "losses": [1.5, 1.25], "pair": (1, "a"), "none": None},
    }
    return model, optimizer, checkpoint


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_torch_dict_roundtrip_is_bit_exact(tmp_path: Path, kind: str) -> None:
    model, optimizer, checkpoint = training_checkpoint(OPTIMIZERS[kind])
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    original = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    bundle = load_checkpoint(tmp_path / "ckpt.pt")
    assert bundle.layout == "torch_dict"
    assert_paired(bundle, model, optimizer)
    assert bundle.tensors["scale"].role is Role.OTHER
    assert "lm_head.weight" not in bundle.tensors  # the tied alias is stored once
    assert bundle.num_parameters() == sum(p.numel() for p in model.parameters())

    out = save_checkpoint(bundle, tmp_path / "restored" / "ckpt.pt")
    restored = torch.load(out, weights_only=True)
    assert_same(original, restored)
    lm_head, wte = restored["model"]["lm_head.weight"], restored["model"]["wte.weight"]
    assert lm_head.data_ptr() == wte.data_ptr()


def test_in_memory_bundle_shares_the_live_tensors() -> None:
    model, optimizer, checkpoint = training_checkpoint(OPTIMIZERS["adamw"])
    bundle = torch_dict.to_bundle(checkpoint)
    assert bundle.tensors["h.0.attn.weight"].tensor is checkpoint["model"]["h.0.attn.weight"]
    exp_avg = bundle.tensors[moment_name("h.0.attn.weight", Role.EXP_AVG)].tensor
    assert any(exp_avg is s["exp_avg"] for s in checkpoint["optimizer"]["state"].values())

    restored = torch_dict.from_bundle(bundle)
    assert_same(checkpoint, restored)
    assert restored["model"]["h.0.attn.weight"] is checkpoint["model"]["h.0.attn.weight"]
    assert restored["model"]["lm_head.weight"] is restored["model"]["wte.weight"]
    assert restored["rng"]["cpu"] is checkpoint["rng"]["cpu"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyGPT().to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    train(model, optimizer, steps=2)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    bundle = load_checkpoint(tmp_path / "ckpt.pt")
    assert_paired(bundle, model, optimizer)
    assert {e.tensor.dtype for e in bundle.tensors.values() if e.role is not Role.OTHER} == {dtype}
    save_checkpoint(bundle, tmp_path / "out.pt")
    assert_same(checkpoint, torch.load(tmp_path / "out.pt", weights_only=True))


def test_parameters_without_state_and_frozen_parameters_are_other(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    model.unused = nn.Linear(D, 5)  # in the optimizer, never gets a gradient
    model.h[1].fc.weight.requires_grad_(False)  # frozen, left out of the optimizer
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3}
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    bundle = load_checkpoint(tmp_path / "ckpt.pt")
    assert_paired(bundle, model, optimizer)
    for name in ("unused.weight", "unused.bias", "h.1.fc.weight"):
        assert bundle.tensors[name].role is Role.OTHER
    assert bundle.tensors["h.1.fc.bias"].role is Role.WEIGHT
    save_checkpoint(bundle, tmp_path / "out.pt")
    assert_same(checkpoint, torch.load(tmp_path / "out.pt", weights_only=True))


class ThreeVectors(nn.Module):
    """Three same-shaped parameters: position alone cannot tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(D))
        self.b = nn.Parameter(torch.randn(D), requires_grad=False)
        self.c = nn.Parameter(torch.randn(D))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        (self.a * self.b * self.c).sum().backward()
        optimizer.step()


def test_ambiguous_pairing_fails_loudly() -> None:
    model = ThreeVectors()
    optimizer = torch.optim.Adam([model.a, model.c], lr=1e-2)
    model.step(optimizer)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with pytest.raises(InvalidInput, match="could be 'a' or 'b'.*named_parameters"):
        torch_dict.to_bundle(checkpoint)


def test_param_names_pair_what_position_cannot() -> None:
    model = ThreeVectors()
    optimizer = torch.optim.Adam([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    model.step(optimizer)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    assert checkpoint["optimizer"]["param_groups"][0]["param_names"] == ["a", "c"]

    bundle = torch_dict.to_bundle(checkpoint)
    assert_paired(bundle, model, optimizer)
    assert bundle.tensors["b"].role is Role.OTHER
    assert_same(checkpoint, torch_dict.from_bundle(bundle))


def test_groups_not_in_model_order_and_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, 2))
    optimizer = torch.optim.Adam(
        [{"params": model[3].parameters(), "lr": 1e-3}, {"params": model[:2].parameters()}]
    )
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    bundle = torch_dict.to_bundle(checkpoint)
    assert_paired(bundle, model, optimizer)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert bundle.tensors[name].role is Role.OTHER
    assert_same(checkpoint, torch_dict.from_bundle(bundle))


def test_tutorial_keys_and_a_checkpoint_without_optimizer(tmp_path: Path) -> None:
    model, optimizer, _ = training_checkpoint(OPTIMIZERS["adam"])
    tutorial = {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    assert_paired(torch_dict.to_bundle(tutorial), model, optimizer)

    torch.save({"model": model.state_dict(), "epoch": 7}, tmp_path / "weights.pt")
    bundle = load_checkpoint(tmp_path / "weights.pt")
    assert bundle.layout == "torch_dict"
    assert not any(e.role in (Role.EXP_AVG, Role.EXP_AVG_SQ) for e in bundle.tensors.values())
    assert bundle.tensors["scale"].role is Role.WEIGHT  # no optimizer: every float is a weight
    assert bundle.num_parameters() == sum(p.numel() for p in model.parameters()) + D


def test_bare_state_dict_from_torch_and_safetensors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, D), nn.BatchNorm1d(D))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    bundle = load_checkpoint(tmp_path / "sd.pt")
    assert bundle.layout == "state_dict"
    assert bundle.tensors["0.weight"].role is Role.WEIGHT
    assert bundle.tensors["1.num_batches_tracked"].role is Role.OTHER
    save_checkpoint(bundle, tmp_path / "sd-out.pt")
    assert_same(model.state_dict(), torch.load(tmp_path / "sd-out.pt", weights_only=True))

    tensors = {"w": torch.randn(3, 4, dtype=torch.bfloat16), "i": torch.arange(5)}
    save_file(tensors, tmp_path / "sd.safetensors", metadata={"format": "pt", "note": "x"})
    bundle = load_checkpoint(tmp_path / "sd.safetensors")
    assert bundle.tensors["w"].role is Role.WEIGHT and bundle.tensors["i"].role is Role.OTHER
    save_checkpoint(bundle, tmp_path / "out.safetensors")
    assert_same(load_file(tmp_path / "sd.safetensors"), load_file(tmp_path / "out.safetensors"))
    with safe_open(tmp_path / "out.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}


# --- Hugging Face Trainer directories ---------------------------------------------


def trainer_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Built as transformers' Trainer.create_optimizer does: decay, then no-decay."""
    in_layernorm = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    decay = {n for n, _ in model.named_parameters() if n not in in_layernorm and "bias" not in n}
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )


def trainer_dir(path: Path, marker: Path, *, weights: str = "model.safetensors") -> tuple:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = trainer_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    train(model, optimizer)
    scheduler.step()
    path.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if weights.endswith(".safetensors"):
        save_file(state, path / weights, metadata={"format": "pt"})
    else:
        torch.save(state, path / weights)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    torch.save(rng, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    (path / "config.json").write_text(json.dumps({"architectures": ["TinyGPT"], "n_embd": D}))
    (path / "training_args.bin").write_bytes(pickle.dumps(Exploit(marker)))
    (path / "runs").mkdir()
    (path / "runs" / "events.out.tfevents.1").write_bytes(os.urandom(64))
    return model, optimizer


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_trainer_directory_roundtrip(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model, optimizer = trainer_dir(tmp_path / "checkpoint-3", marker)
    order = [n for n, _ in model.named_parameters()]

    bundle = load_checkpoint(tmp_path / "checkpoint-3", param_order=order)
    assert bundle.layout == "hf_trainer"
    assert_paired(bundle, model, optimizer)
    assert bundle.tensors["scale"].role is Role.OTHER
    assert set(k for k in bundle.extras if k.startswith("hf/")) == {
        "hf/config.json",
        "hf/rng_state.pth",
        "hf/runs/events.out.tfevents.1",
        "hf/scheduler.pt",
        "hf/trainer_state.json",
        "hf/training_args.bin",
    }

    (tmp_path / "out").mkdir()  # an existing empty directory is a fine target
    save_checkpoint(bundle, tmp_path / "out")
    before, after = files_of(tmp_path / "checkpoint-3"), files_of(tmp_path / "out")
    assert set(before) == set(after)
    for name in set(before) - {"model.safetensors", "optimizer.pt"}:
        assert before[name] == after[name], name
    assert_same(
        load_file(tmp_path / "checkpoint-3" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert_same(
        torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True),
        torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True),
    )
    assert not marker.exists()

    with pytest.raises(InvalidInput, match="already exists"):
        save_checkpoint(bundle, tmp_path / "out")


def test_trainer_directory_needs_a_parameter_order_for_safetensors(tmp_path: Path) -> None:
    trainer_dir(tmp_path / "ckpt", tmp_path / "pwned")
    with pytest.raises(InvalidInput, match="order is unknown.*param_order=.*transformers"):
        load_checkpoint(tmp_path / "ckpt")


def test_trainer_directory_order_from_transformers_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = trainer_dir(tmp_path / "ckpt", tmp_path / "pwned")
    stub = types.ModuleType("transformers")
    seen = []

    class AutoConfig:
        @staticmethod
        def from_pretrained(path: str) -> types.SimpleNamespace:
            seen.append(path)
            config = json.loads((Path(path) / "config.json").read_text())
            return types.SimpleNamespace(**config)

    stub.AutoConfig = AutoConfig  # type: ignore[attr-defined]
    stub.TinyGPT = TinyGPT  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", stub)

    bundle = load_checkpoint(tmp_path / "ckpt")
    assert seen == [str(tmp_path / "ckpt")]
    assert_paired(bundle, model, optimizer)


def test_trainer_directory_with_pytorch_model_bin(tmp_path: Path) -> None:
    # .bin keeps state-dict order (with the "scale" buffer first, shaped like the
    # norms): pairing needs no help, the Trainer's decay rule breaks the tie.
    model, optimizer = trainer_dir(tmp_path / "ckpt", tmp_path / "pwned", weights="pytorch_model.bin")
    bundle = load_checkpoint(tmp_path / "ckpt")
    assert_paired(bundle, model, optimizer)
    save_checkpoint(bundle, tmp_path / "out")
    assert_same(
        torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True),
        torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True),
    )


# --- refusing what is not a checkpoint ----------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.write_bytes(os.urandom(256)),
        lambda p: p.write_text(json.dumps({"model": {"w": [1.0, 2.0]}})),
        lambda p: torch.save({"a": "b", "c": "d"}, p),
        lambda p: torch.save([torch.zeros(2)], p),
        lambda p: torch.save({}, p),
    ],
    ids=["random-bytes", "json", "dict-of-strings", "list", "empty-dict"],
)
def test_not_a_checkpoint(tmp_path: Path, write: Callable[[Path], Any]) -> None:
    write(tmp_path / "thing")
    with pytest.raises(InvalidInput) as info:
        load_checkpoint(tmp_path / "thing")
    assert "is not a checkpoint" in info.value.message and "excp accepts" in info.value.message
    assert "\n" not in info.value.message


def test_a_directory_without_weights_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidInput, match="is not a checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(NotFound):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "evil": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInput, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the file really is hostile
    assert marker.exists()


def test_in_memory_objects_that_cannot_be_restored_safely_are_refused() -> None:
    with pytest.raises(InvalidInput, match="cannot be stored safely"):
        torch_dict.to_bundle({"model": {"w": torch.zeros(2)}, "hook": Exploit(Path("x"))})


def test_an_object_torch_will_not_unpickle_is_named_in_one_line() -> None:
    """Not torch's page of advice cut at some length: the type, in a complete line."""
    with pytest.raises(InvalidInput) as caught:
        torch_dict.to_bundle({"model": {"w": torch.zeros(2)}, "when": datetime.date(2024, 1, 1)})
    assert caught.value.message == (
        "the checkpoint holds an object that cannot be stored safely (a pickled datetime.date, which excp "
        "does not unpickle); keep only tensors, numbers, strings, lists, tuples and dicts in it")


def test_a_malformed_optimizer_is_named() -> None:
    checkpoint = {"model": {"w": torch.zeros(2)}, "optimizer": {"lr": 0.1}}
    with pytest.raises(InvalidInput, match="'optimizer' is not an optimizer state_dict"):
        torch_dict.to_bundle(checkpoint)


def test_outputs_are_never_overwritten(tmp_path: Path) -> None:
    bundle = state_dict.to_bundle({"w": torch.zeros(2)})
    (tmp_path / "taken.pt").write_bytes(b"mine")
    with pytest.raises(InvalidInput, match="already exists"):
        save_checkpoint(bundle, tmp_path / "taken.pt")
    assert (tmp_path / "taken.pt").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt"]


def test_a_bundle_that_does_not_fit_its_skeleton_is_corrupt() -> None:
    bundle = state_dict.to_bundle({"w": torch.zeros(2, 3)})
    bundle.tensors["w"].tensor = torch.zeros(3, 2)
    with pytest.raises(CorruptData, match="'w' is \\[3, 2\\]"):
        state_dict.from_bundle(bundle)
    del bundle.tensors["w"]
    with pytest.raises(CorruptData, match="lacks tensor 'w'"):
        state_dict.from_bundle(bundle)
