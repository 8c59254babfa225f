"""The uniform residual quantizer: grouping, error bounds, exact zeros, and its unit
through the lossy codec (encoder and decoder agree bit for bit)."""

import io

import numpy as np
import pytest
import torch
import zstandard

from excp.bundle import Role
from excp.codec import lossy, uniform
from excp.codec.params import CodecParams
from excp.codec.pipeline import decode_archive
from excp.errors import CorruptData
from excp.format.container import ArchiveReader, ArchiveWriter

UNIFORM = CodecParams(weight_rule="uniform")
FP32 = {Role.WEIGHT: torch.float32, Role.EXP_AVG: torch.float32, Role.EXP_AVG_SQ: torch.float32}


def _laplace(n: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).laplace(0.0, scale, n)).float()


@pytest.mark.parametrize(("levels", "size"), [(1, 5), (2, 3), (3, 2), (7, 2), (8, 1), (127, 1)])
def test_group_size_fits_a_byte(levels: int, size: int) -> None:
    assert uniform.group_size(levels) == size
    assert (2 * levels + 1) ** size <= 256 < (2 * levels + 1) ** (size + 1)


@pytest.mark.parametrize("levels", [1, 2, 3, 5, 7, 8, 20, 127])
@pytest.mark.parametrize("n", [1, 4, 5, 999])
def test_pack_and_values_roundtrip_every_digit(levels: int, n: int) -> None:
    rng = np.random.default_rng(levels * n)
    digits = torch.from_numpy(rng.integers(0, 2 * levels + 1, n)).to(torch.uint8)
    book = torch.arange(-levels, levels + 1, dtype=torch.float32) * 0.5
    packed = uniform.pack_digits(digits, levels)
    assert packed.numel() == uniform.packed_size(n, levels)
    assert torch.equal(uniform.values(packed, book, n), book[digits.long()])


@pytest.mark.parametrize("step", [0.5, 1.5, 3.0])
def test_error_is_within_a_step_and_zero_bin_is_exact(step: float) -> None:
    x = _laplace(200_000, 1)
    q = uniform.quantize(x, step)
    restored = uniform.values(q.packed, q.book, q.n)
    width = step * float(x.pow(2).mean().sqrt())
    assert float((restored - x).abs().max()) <= width * 1.001
    small = x.abs() < 0.49 * width
    assert bool((restored[small] == 0).all()), "values within half a step must come back as 0"
    assert float((restored - x).pow(2).mean()) < width ** 2 / 12 * 1.05


def test_outliers_are_never_clipped() -> None:
    x = _laplace(100_000, 2)
    x[17] = 5.0  # 5000 times the typical magnitude
    q = uniform.quantize(x, 1.5)
    restored = uniform.values(q.packed, q.book, q.n)
    assert abs(float(restored[17]) - 5.0) <= 5.0 / uniform.MAX_LEVEL
    assert q.book.numel() == 2 * uniform.MAX_LEVEL + 1


def test_all_zero_residual_costs_no_code_bytes() -> None:
    q = uniform.quantize(torch.zeros(1000), 1.5)
    assert q.packed.numel() == 0 and q.book.tolist() == [0.0]
    assert torch.equal(uniform.values(q.packed, q.book, 1000), torch.zeros(1000))


def test_grouping_brings_zstd_close_to_the_entropy() -> None:
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3))
    q = uniform.quantize(x, 2.0)
    assert uniform.group_size((q.book.numel() - 1) // 2) > 1
    levels = np.rint(x.numpy() / (2.0 * float(x.pow(2).mean().sqrt())))
    p = np.unique(levels, return_counts=True)[1] / levels.size
    entropy_bytes = float(-(p * np.log2(p)).sum()) * levels.size / 8
    coded = len(zstandard.ZstdCompressor(level=3).compress(q.packed.numpy().tobytes()))
    ungrouped = len(zstandard.ZstdCompressor(level=3).compress(levels.astype(np.int8).tobytes()))
    assert coded < 1.15 * entropy_bytes
    assert coded < 0.85 * ungrouped


def _unit(n: int, keyframe: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    parent = None if keyframe else w - _laplace(n, seed + 1)
    moments = {Role.EXP_AVG: torch.randn(n, generator=g) * 1e-3,
               Role.EXP_AVG_SQ: torch.rand(n, generator=g) * 1e-6}
    enc, recon = lossy.encode_unit(w, parent, moments, UNIFORM, keyframe)
    out = lossy.decode_unit(enc, parent, FP32, (n,), torch.device("cpu"))
    return w, parent, enc, recon, out


@pytest.mark.parametrize("keyframe", [False, True])
@pytest.mark.parametrize("n", [1, 7, 4096, 100_003])
def test_decoder_gives_what_the_encoder_committed_to(n: int, keyframe: bool) -> None:
    w, parent, enc, recon, out = _unit(n, keyframe)
    assert enc.meta["dense"] and "mask" not in enc.streams
    assert torch.equal(out[Role.WEIGHT], recon)
    if parent is not None:
        unsent = recon == parent
        assert int((~unsent).sum()) == enc.meta["sent"]
    kept = out[Role.EXP_AVG_SQ] != 0
    assert int(kept.sum()) == enc.meta["moments"]


def test_keyframe_is_finer_than_a_link() -> None:
    w, _, _, recon, _ = _unit(100_000, True)
    assert float((recon - w).pow(2).mean().sqrt()) < 0.05 * float(w.pow(2).mean().sqrt())


def _decode_tampered(change) -> None:
    """Write a one-unit keyframe archive whose streams ``change`` edits (the checksums
    stay valid), then decode it."""
    _, _, enc, _, _ = _unit(1000, True)
    change(enc.streams)
    specs = [{"name": "w" if role == "weight" else f"w@{role}", "role": role,
              "param": None if role == "weight" else "w", "dtype": "float32", "shape": [1000]}
             for role in ("weight", "exp_avg", "exp_avg_sq")]
    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    writer.add_unit("w", "excp", specs, enc.meta, enc.streams)
    writer.finish({"layout": "state_dict", "step": 1, "parent": None, "keyframe": True,
                   "params": UNIFORM.to_dict()})
    decode_archive(ArchiveReader(io.BytesIO(buf.getvalue()), len(buf.getvalue()), "t"), None)


TAMPERED = {
    "even number of levels": (lambda s: s.update(wbook=s["wbook"][:-4]), "odd number of levels"),
    "more than 255 levels": (lambda s: s.update(wbook=torch.zeros(4 * 257, dtype=torch.uint8)),
                             "odd number of levels"),
    "codes one byte short": (lambda s: s.update(wcodes=s["wcodes"][:-1]), "'wcodes' has the wrong size"),
    "no codebook": (lambda s: s.pop("wbook"), "odd number of levels"),
    "moment mask cut": (lambda s: s.update(mmask=s["mmask"][:-1]), "'mmask' has the wrong size"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_inconsistent_dense_streams_are_corrupt_data(name: str) -> None:
    change, message = TAMPERED[name]
    _decode_tampered(lambda s: None)  # the untouched unit decodes
    with pytest.raises(CorruptData, match=message):
        _decode_tampered(change)
