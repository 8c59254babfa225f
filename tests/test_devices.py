"""One codec on every device: a chain coded on a GPU is byte-identical to the CPU's,
and every archive decodes to bit-identical tensors on any device.

CPU tensors go through numpy for packing and lookups; a GPU runs the torch
formulation of the same steps. ``cpu-torch`` runs that torch formulation on CPU
tensors, so CI (no GPU) checks the code a GPU runs; where CUDA is present the same
tests run on ``cuda`` too.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from excp import api
from excp.bundle import Bundle, TensorEntry
from excp.chain import Chain
from excp.codec import pack
from excp.codec.params import PRESETS
from excp.format.container import ArchiveReader
from excp.store import MemoryStore
from tests.conftest import TinyRun

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu", "cpu-torch"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {"default": torch.float32, "paper": torch.float32, "lossless": torch.float32,
         "default-bf16": torch.bfloat16}


def _device(name: str, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    if name == "cpu-torch":
        monkeypatch.setattr(pack, "numpy_path", lambda _: False)
        return torch.device("cpu")
    return torch.device(name)


def _on(bundle: Bundle, device: torch.device) -> Bundle:
    moved = Bundle(bundle.layout, extras=dict(bundle.extras), step=bundle.step)
    for entry in bundle.tensors.values():
        moved.add(TensorEntry(entry.name, entry.role, entry.tensor.to(device), entry.param))
    return moved


def _checkpoints(dtype: torch.dtype) -> list[Bundle]:
    """Three checkpoints of a run whose tensors are large enough for k-means and the
    uniform grid (not the exact paths small tensors take)."""
    tiny = TinyRun(seed=4, dtype=dtype, width=512)
    return [api.to_bundle(tiny.advance(5)) for _ in range(3)]


def _code_chain(case: str, device: torch.device) -> tuple[list[str], list[bytes]]:
    """Push the three checkpoints, coded on ``device``; their archive digests and bytes."""
    store = MemoryStore()
    chain = Chain(store, "run")
    chain.create(PRESETS[case.removesuffix("-bf16")], None)
    recon: dict = {}
    for step, bundle in enumerate(_checkpoints(CASES[case]), start=1):
        result, recon = chain.push(_on(bundle, device), step, lambda _, r=recon: r)
        assert result.created
    commits = chain.commits()
    return [c.digest for c in commits], [store.get(c.archive) for c in commits]


def _decode_chain(archives: list[bytes], device: torch.device) -> list[dict[str, torch.Tensor]]:
    from excp.codec.pipeline import decode_archive

    recon, restored = None, []
    for data in archives:
        bundle, recon = decode_archive(ArchiveReader(io.BytesIO(data), len(data), "archive"), recon, device)
        assert all(e.tensor.device.type == device.type for e in bundle.tensors.values())
        restored.append({name: e.tensor.cpu() for name, e in bundle.tensors.items()})
    return restored


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[str], list[bytes], list[dict[str, torch.Tensor]]]]:
    """Each case coded and decoded on CPU through numpy, as excp runs there."""
    found = {}
    for case in CASES:
        digests, archives = _code_chain(case, torch.device("cpu"))
        found[case] = (digests, archives, _decode_chain(archives, torch.device("cpu")))
    return found


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_coding_on_any_device_gives_the_same_archives(case: str, device: str, reference,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    digests, _ = _code_chain(case, _device(device, monkeypatch))
    assert digests == reference[case][0], f"{case} coded on {device} differs from the CPU's archives"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_decoding_on_any_device_gives_the_same_tensors(case: str, device: str, reference,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, archives, expected = reference[case]
    restored = _decode_chain(archives, _device(device, monkeypatch))
    for step, (got, want) in enumerate(zip(restored, expected, strict=True), start=1):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype, (case, step, name)
            assert torch.equal(_bytes(got[name]), _bytes(want[name])), (case, step, name)


def test_the_torch_formulation_really_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cpu-torch`` is not the numpy path under another name: the patched predicate
    is what the codec consults."""
    calls = []
    monkeypatch.setattr(pack, "numpy_path", lambda t: calls.append(t.device.type) or False)
    _code_chain("paper", torch.device("cpu"))
    assert calls and set(calls) == {"cpu"}


@pytest.mark.slow
def test_the_gpu_benchmark_runs_and_checks_determinism(tmp_path) -> None:
    """benchmarks/gpu.py is what a GPU session runs in one call; here it runs on CPU at
    a small size, so the script itself is known to work before device time is spent."""
    out = tmp_path / "gpu.json"
    device = "cuda" if "cuda" in DEVICES else "cpu"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", device,
                           "--params", "2e6", "--tensor", "1e6", "--model-layers", "1", "--model-width", "64",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["determinism"] == {"archives_identical": True, "decodes_identical": True}
    assert figures["synthetic"]["params"] == 2 * (10**6 // 1024 * 1024)  # two tensors of whole rows
    assert all(seconds > 0 for seconds in figures["stages_s"].values())
    assert figures["synthetic"]["link_ratio"] > 10 and figures["model"]["link_ratio"] > 5
    assert 0 < figures["floor_s"]["encode"] < figures["synthetic"]["link_encode_s"]
    assert "hook stall" in done.stdout


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_the_encoders_working_set_is_bounded_per_element(path: str) -> None:
    """The encoder's extra memory for one weight and its moments (default preset),
    reconstruction included, stays under 17 bytes per element (measured 15.0): a
    training job must leave that much beside its largest tensor, on its GPU too."""
    command = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--elements", "8e6"]
    done = subprocess.run(command + (["--torch-path"] if path == "torch" else []), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert 4 <= figures["bytes_per_element"] < 17, figures  # at least the reconstruction it returns
