"""Archives written by an earlier excp must decode, bit for bit, with today's decoder.

The archives and what restore gave back when they were made live under
``tests/golden/v1/`` (built by ``tests/golden/make_golden.py``). Each case is a chain
of three steps, a keyframe then two links; it is decoded here straight from the
archive files, each step against the previous step's reconstruction, so a change in
the container reader, the codecs or the chain's closed loop that alters a single
restored bit fails this test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from excp.codec.pipeline import decode_archive
from excp.format.container import ArchiveReader

GOLDEN = Path(__file__).parent / "golden" / "v1"
CASES = {
    # case: (mode, layout, has moments, weight dtype, amsgrad state)
    "fp32": ("excp", "torch_dict", True, torch.float32, False),
    "bf16": ("excp", "torch_dict", True, torch.bfloat16, False),
    "amsgrad": ("excp", "torch_dict", True, torch.float32, True),
    "weights_only": ("excp", "state_dict", False, torch.float32, False),
    "lossless": ("lossless", "torch_dict", True, torch.float32, False),
    "uniform": ("excp", "torch_dict", True, torch.float32, False),
    "uniform_bf16": ("excp", "torch_dict", True, torch.bfloat16, False),
    "adam": ("excp", "torch_dict", True, torch.float32, False),
    "adam_bf16": ("excp", "torch_dict", True, torch.bfloat16, False),
    "adam_amsgrad": ("excp", "torch_dict", True, torch.float32, True),
    "adam_weights_only": ("excp", "state_dict", False, torch.float32, False),
}


def _steps(case: str) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in (GOLDEN / case).glob("*.excp"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_every_case_is_committed() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(CASES)
    for case in CASES:
        steps = _steps(case)
        assert len(steps) == 3, (case, steps)
        for step in steps:
            assert (GOLDEN / case / f"{step}.expected.safetensors").is_file()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_chain_decodes_bit_identically(case: str) -> None:
    mode, layout, has_moments, dtype, amsgrad = CASES[case]
    steps = _steps(case)
    recon = None
    for i, step in enumerate(steps):
        path = GOLDEN / case / f"{step}.excp"
        with open(path, "rb") as handle:
            reader = ArchiveReader(handle, path.stat().st_size, str(path))
            reader.verify()
            header = reader.header
            assert header["step"] == step and header["layout"] == layout
            assert header["params"]["mode"] == mode
            assert header["keyframe"] == (i == 0)
            assert header["parent"] == (None if i == 0 else steps[i - 1])
            codecs = {u.codec for u in reader.units} - {"planes"}
            assert codecs == ({"adam"} if case.startswith("adam") else {"excp"} if mode == "excp" else set())
            dense = {bool(u.meta.get("dense")) for u in reader.units if u.codec == "excp"}
            assert dense == ({True} if case.startswith("uniform") else set() if case.startswith("adam")
                             else {False} if mode == "excp" else set())
            bundle, recon = decode_archive(reader, None if i == 0 else recon)

        expected_path = GOLDEN / case / f"{step}.expected.safetensors"
        expected = load_file(str(expected_path))
        with safe_open(str(expected_path), framework="pt") as handle:
            about = json.loads(handle.metadata()["excp_golden"])
        assert bundle.layout == about["layout"] and bundle.step == about["step"]
        assert {k: hashlib.blake2b(v, digest_size=16).hexdigest()
                for k, v in bundle.extras.items()} == about["extras"]

        restored = {e.name: e.tensor for e in bundle.tensors.values()}
        assert sorted(restored) == sorted(expected)
        for name, want in expected.items():
            got = restored[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(_bits(got), _bits(want)), f"{case} step {step}: {name} differs"

        roles = {e.role.value for e in bundle.tensors.values()}
        assert ("exp_avg_sq" in roles) == has_moments
        assert ("max_exp_avg_sq" in roles) == amsgrad
        assert bundle.tensors["0.weight"].tensor.dtype == dtype
        if mode == "excp" and has_moments:
            # the invariant of the format: no position restores with m != 0 and v == 0
            for e in bundle.tensors.values():
                if e.role.value == "exp_avg":
                    v = restored[f"{e.param}@exp_avg_sq"]
                    assert not bool(((e.tensor != 0) & (v == 0)).any()), e.name
                    if case.startswith("adam"):  # and none with v == 0 where v was not
                        assert bool((v > 0).all()), e.name


def test_golden_links_need_their_parent() -> None:
    """A link decoded against the wrong parent gives different weights: the goldens
    really exercise the closed loop, not three standalone keyframes."""
    steps = _steps("fp32")
    readers = []
    for step in steps:
        path = GOLDEN / "fp32" / f"{step}.excp"
        readers.append((open(path, "rb"), path.stat().st_size))
    try:
        _, recon0 = decode_archive(ArchiveReader(*readers[0]), None)
        _, recon1 = decode_archive(ArchiveReader(*readers[1]), recon0)
        right, _ = decode_archive(ArchiveReader(*readers[2]), recon1)
        wrong, _ = decode_archive(ArchiveReader(*readers[2]), recon0)
    finally:
        for handle, _ in readers:
            handle.close()
    assert not torch.equal(right.tensors["0.weight"].tensor, wrong.tensors["0.weight"].tensor)
