"""The default unit codec: one weight and its Adam state, coded so that training
resumed from the reconstruction steps like training resumed from the original.

Each error is budgeted in the units Adam itself works in, so the same settings hold
across learning rates, β2, checkpoint intervals and phases of training:

* **v** (``exp_avg_sq``) is coded at *every* position, never as zero where it was not
  (a zeroed v makes Adam's first steps (1−β1)/√(1−β2) times too long or short and
  takes ~1/(1−β2) steps to heal). It is predicted by a rank-1 factorisation (row
  means × column means / mean, as Adafactor keeps it; a constant for vectors), and
  the ratio v / prediction is rounded to a power of 2^``v_step``: v̂ is within a
  factor 2^(``v_step``/2) of v, so Adam's step size within 2^(``v_step``/4).
* **m** (``exp_avg``) is coded as m / √v̂, the direction of Adam's next step, in
  uniform levels ``m_step`` apart; dropping m instead costs ~1/(1−β1) steps of
  momentum right after the restore, which is measured to move the loss.
* **W**: ΔW = W − Ŵ_parent (W for a keyframe) is coded in levels
  q = ``lr_step`` · lr apart, lr the learning rate of the weight's optimizer group at
  this step: the error is at most half a level, a few Adam updates' worth, whatever
  the interval or phase. Per position the level is finer where v is large:
  q · 2^−s with s = round(log2(v̂ / v_ref) / 4), v_ref the geometric mean of v̂, s
  clamped to [−``COARSER``, ``FINER``] (loss curvature grows with √v, so equal damage
  per position means q ∝ v^−1/4). Without a learning rate (weights-only input)
  q = ``weight_step`` · RMS(ΔW) (``keyframe_step`` · RMS(W) for a keyframe).

m and ΔW are quantized with *subtractive dither*: a pseudo-random offset u ∈ [−½, ½)
per position, the same in encoder and decoder, is added before rounding and taken
off after, so the error is uniform and independent of the value. What training
needs from m and ΔW is their small coherent part (the direction of progress, shared
by many positions and far below one level per position); rounding without dither
sends most positions to level 0 and loses it — measured, the restored run then lags
the original by several steps (+1% loss), where the dithered one at twice the level
spacing does not. Levels are reconstructed at their centres for the same reason: a
bin's mean is closer to the values in it but shrinks the coherent part.

Every quantity the decoder computes is exact in IEEE float32 on any device: v̂ is a
product of stored float32 factors and an exact power of two, per-position steps are
powers of two, codes are chosen against thresholds in the value domain. So Ŵ, the
state the next link is coded against, is bit-identical wherever it is decoded.

Streams (uint8) and meta of a unit are listed in docs/format.md (unit codec ``adam``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from excp.bundle import Role
from excp.codec import pack, uniform
from excp.codec.params import CodecParams
from excp.codec.stats import strided_sample
from excp.codec.types import Encoded
from excp.errors import CorruptData

FINER, COARSER = 4, 2  # per-position steps span q·2^-4 .. q·2^2
UNTOUCHED = FINER + COARSER + 1  # the grid digit of a position whose v̂ is 0
BLOCK = 1 << 18  # elements per float64 block of a moment's row/column means
TINY, HUGE = 2.0 ** -149, 2.0 ** 127  # ratios are clamped into float32's range
MAX_V_LEVEL = 127
EXACT_INTEGERS = 1 << 23  # every wide code is an exact float32 integer
_SECOND = {Role.EXP_AVG_SQ: "v", Role.MAX_EXP_AVG_SQ: "x"}


def weight_step(params: CodecParams, lr: float | None, delta: torch.Tensor, keyframe: bool) -> float:
    """q: ``lr_step`` · lr when the weight's learning rate is known, else a fraction of
    the RMS of what is being coded."""
    if lr is not None and math.isfinite(lr) and lr > 0:
        return float(np.float32(params.lr_step * lr))
    sample = strided_sample(delta)
    rms = math.sqrt(float(np.mean(sample * sample))) if sample.size else 0.0
    return float(np.float32((params.keyframe_step if keyframe else params.weight_step) * rms))


def encode_unit(weight: torch.Tensor, parent: torch.Tensor | None, moments: dict[Role, torch.Tensor],
                params: CodecParams, keyframe: bool, lr: float | None, seed: int = 0,
                ) -> tuple[Encoded, torch.Tensor]:
    """Code one weight and its moments; returns the unit and the weight's
    reconstruction (the input's dtype and shape), which the next link is coded against.
    ``seed`` (32 bits) picks the dither; give each unit of a chain its own."""
    shape = tuple(weight.shape)
    enc = Encoded(meta={"keyframe": keyframe, "dither": seed & 0xFFFFFFFF})
    v_hat = None
    for role, key in _SECOND.items():
        if role in moments:
            recon = _encode_second(enc, key, moments[role], shape, params.v_step)
            if role is Role.EXP_AVG_SQ:
                v_hat = recon
    grid = None
    if v_hat is not None:
        if Role.EXP_AVG in moments:
            _encode_first(enc, moments[Role.EXP_AVG].reshape(-1), v_hat, params.m_step)
        enc.meta["vref"] = _geometric_mean(v_hat)
        grid = _grid(v_hat, enc.meta["vref"])
        enc.meta["shift"] = True
        del v_hat
    w = weight.reshape(-1).float()
    base = None if parent is None else parent.reshape(-1).float()
    if base is None:  # the caller's tensor: coded from a copy
        values = _encode_weight(enc, w.clone(), weight_step(params, lr, w, keyframe), grid)
    else:
        values = _encode_weight(enc, w - base, lambda delta: weight_step(params, lr, delta, keyframe), grid)
    return enc, _add(base, values).to(weight.dtype).view(weight.shape)


@dataclass
class Grid:
    """Where a weight's levels lie: per position the step exponent s (uint8 digits
    s + ``COARSER``), or ``UNTOUCHED`` where v̂ is 0. There s = 0 and the code is not
    dithered: a position that never had a gradient has nothing to keep coherent, and
    rounding it without dither lets an unmoved position stay exactly where it was, at
    no cost."""

    digits: torch.Tensor


def _grid(v_hat: torch.Tensor, ref: float) -> Grid:
    return Grid(_shift(v_hat, ref))


def decode_unit(enc: Encoded, parent: torch.Tensor | None, dtypes: dict[Role, torch.dtype],
                shape: tuple[int, ...], device: torch.device) -> dict[Role, torch.Tensor]:
    """The tensors named in ``dtypes`` (the weight always; v is decoded whenever the
    weight's per-position steps need it)."""
    n = math.prod(shape)
    out: dict[Role, torch.Tensor] = {}
    v_hat = None
    for role, key in _SECOND.items():
        if role in dtypes or (role is Role.EXP_AVG_SQ and enc.meta.get("shift")):
            recon = _decode_second(enc, key, shape, device)
            if role is Role.EXP_AVG_SQ:
                v_hat = recon
            if role in dtypes:
                out[role] = recon.to(dtypes[role]).view(shape)
    if Role.EXP_AVG in dtypes:
        out[Role.EXP_AVG] = _decode_first(enc, v_hat).to(dtypes[Role.EXP_AVG]).view(shape)
    grid = _grid(v_hat, enc.meta["vref"]) if enc.meta.get("shift") else None
    del v_hat
    values = _decode_weight(enc, n, grid, device)
    base = None if parent is None else parent.reshape(-1).float()
    out[Role.WEIGHT] = _add(base, values).to(dtypes[Role.WEIGHT]).view(shape)
    return out


def check_streams(enc: Encoded, shape: tuple[int, ...], roles: set[Role], label: str) -> None:
    """Stream sizes and meta must agree with the tensor table before any indexing;
    ``roles`` are the unit's tensors. Raises CorruptData naming ``label``."""
    rows, cols = _matrix(shape)
    n = rows * cols
    meta, s = enc.meta, enc.streams
    q = meta.get("q")
    if not _number(q) or q < 0:
        raise CorruptData(f"{label}: bad weight step {q!r}")
    expected: dict[str, int] = {}
    wide = meta.get("wide")
    if wide is not None:
        if wide not in (2, 4) or isinstance(wide, bool):
            raise CorruptData(f"{label}: bad code width {wide!r}")
        expected["wcodes"] = n * wide
    else:
        expected["wcodes"] = uniform.packed_size(n, _meta_levels(meta, "wlevels", label))
    if meta.get("shift") and Role.EXP_AVG_SQ not in roles:
        raise CorruptData(f"{label}: per-position steps without a second moment")
    for role, key in _SECOND.items():
        if role not in roles:
            continue
        levels, step = meta.get(f"{key}levels"), meta.get(f"{key}step")
        if not _small_int(levels, MAX_V_LEVEL) or not _small_int(step, 16) or step < 1:
            raise CorruptData(f"{label}: bad {key} levels or step in the unit's meta")
        expected[f"{key}row"] = 4 * rows
        if len(shape) >= 2:
            expected[f"{key}col"] = 4 * cols
        expected[f"{key}codes"] = uniform.packed_size(n, levels)
        if f"{key}zero" in s:
            expected[f"{key}zero"] = -(-n // 8)
    if meta.get("shift") and not (_number(meta.get("vref")) and meta["vref"] >= 0):
        raise CorruptData(f"{label}: per-position steps without a valid vref")
    if Role.EXP_AVG in roles:
        if Role.EXP_AVG_SQ not in roles:
            raise CorruptData(f"{label}: exp_avg without exp_avg_sq")
        if not _number(meta.get("mstep")) or meta["mstep"] <= 0:
            raise CorruptData(f"{label}: bad m step {meta.get('mstep')!r}")
        expected["mcodes"] = uniform.packed_size(n, _meta_levels(meta, "mlevels", label))
    if (wide is None or Role.EXP_AVG in roles) and not _small_int(meta.get("dither"), 2**32 - 1):
        raise CorruptData(f"{label}: bad dither seed {meta.get('dither')!r}")
    for name, size in expected.items():
        if name not in s or s[name].numel() != size:
            raise CorruptData(f"{label}: stream {name!r} has the wrong size")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _small_int(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _meta_levels(meta: dict, key: str, label: str) -> int:
    levels = meta.get(key)
    if not _small_int(levels, uniform.MAX_LEVEL):
        raise CorruptData(f"{label}: bad {key} {levels!r}")
    return levels


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the rank-1 factorisation: a matrix (a higher-order tensor with
    its trailing dimensions flattened) by its first dimension; a vector is one row
    with a constant prediction."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and n else 1
    return rows, n // rows


def _floats(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _pow2_book(levels: int, step: int, device: torch.device) -> torch.Tensor:
    """2^(k·step) for k = −levels..levels: exact float32 powers of two."""
    exponents = (np.arange(2 * levels + 1) - levels) * step
    return torch.from_numpy(np.ldexp(np.float32(1), exponents).astype(np.float32)).to(device)


def _encode_second(enc: Encoded, key: str, v: torch.Tensor, shape: tuple[int, ...],
                   step: int) -> torch.Tensor:
    """Code a second moment; returns v̂, flat float32. Works a block at a time, so its
    scratch memory is two bytes per element (codes and the zero mask)."""
    rows, cols = _matrix(shape)
    v = v.reshape(rows, cols).float()
    row64 = _mean64(v, 1)
    mean = float(row64.mean()) if rows else 0.0
    row = row64.float().to(v.device)
    col = None
    if len(shape) >= 2:
        col64 = _mean64(v, 0)
        col = (col64 / mean if mean > 0 else col64).float().to(v.device)
    levels = 0
    for block in _blocks(rows, cols):
        ratio = _ratio(v, row, col, block)
        if ratio.numel():
            low, high = torch.aminmax(ratio)
            levels = max(levels, _levels_for(float(low), step), _levels_for(float(high), step))
    bounds = np.ldexp(np.float32(1), np.arange(-levels, levels) * step) * np.float32(math.sqrt(2.0) ** step)
    bounds = torch.from_numpy(bounds.astype(np.float32)).to(v.device)
    digits = torch.empty(rows * cols, dtype=torch.uint8, device=v.device)
    for block in _blocks(rows, cols):
        ratio = _ratio(v, row, col, block)
        digits[_flat(block, cols)] = torch.bucketize(ratio, bounds, right=True, out_int32=True).view(-1)
    del ratio
    zero = (v == 0).view(-1)
    enc.streams[f"{key}row"] = _floats(row)
    if col is not None:
        enc.streams[f"{key}col"] = _floats(col)
    if bool(zero.any()):
        enc.streams[f"{key}zero"] = pack.pack_mask(zero)
    del zero
    enc.streams[f"{key}codes"] = uniform.pack_digits(digits, levels)
    del digits
    enc.meta[f"{key}levels"], enc.meta[f"{key}step"] = levels, step
    return _second_values(enc, key, row, col, rows, cols, v.device)


def _blocks(rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) blocks of at most ``BLOCK`` elements, in flat order, each
    contiguous in the flat tensor: whole rows, or pieces of one long row."""
    if cols <= BLOCK:
        step = max(1, BLOCK // max(cols, 1))
        return [(r, min(rows, r + step), 0, cols) for r in range(0, rows, step)]
    return [(r, r + 1, c, min(cols, c + BLOCK)) for r in range(rows) for c in range(0, cols, BLOCK)]


def _flat(block: tuple[int, int, int, int], cols: int) -> slice:
    r0, r1, c0, c1 = block
    return slice(r0 * cols + c0, (r1 - 1) * cols + c1)


def _ratio(v: torch.Tensor, row: torch.Tensor, col: torch.Tensor | None,
           block: tuple[int, int, int, int]) -> torch.Tensor:
    """v / prediction over one block, clamped into float32's range; 1 where v is 0."""
    r0, r1, c0, c1 = block
    part = v[r0:r1, c0:c1]
    ratio = part / row[r0:r1].view(-1, 1)
    if col is not None:
        ratio.div_(col[c0:c1].view(1, -1))
    return ratio.masked_fill_(part == 0, 1.0).nan_to_num_(nan=1.0, posinf=HUGE).clamp_(TINY, HUGE)


def _levels_for(ratio: float, step: int) -> int:
    """Levels k (ratio ≈ 2^(k·step)) needed to hold ``ratio``, at most 127."""
    return min(MAX_V_LEVEL, math.ceil(abs(math.log2(ratio)) / step + 0.5))


def _mean64(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Means along ``dim`` accumulated in float64 a block at a time (never a float64
    copy of the whole tensor), on the host: rounded to float32 they are the same on
    every device whatever order the reduction took."""
    rows, cols = v.shape
    total = torch.zeros(rows if dim == 1 else cols, dtype=torch.float64, device=v.device)
    for r0, r1, c0, c1 in _blocks(rows, cols):
        part = v[r0:r1, c0:c1].double().sum(dim=dim)
        if dim == 1:
            total[r0:r1] += part
        else:
            total[c0:c1] += part
    return (total / max(cols if dim == 1 else rows, 1)).cpu()


def _second_values(enc: Encoded, key: str, row: torch.Tensor, col: torch.Tensor | None, rows: int, cols: int,
                   device: torch.device) -> torch.Tensor:
    """v̂ = prediction · 2^(k·step), 0 where v was 0; flat float32."""
    meta = enc.meta
    book = _pow2_book(meta[f"{key}levels"], meta[f"{key}step"], device)
    values = uniform.values(enc.streams[f"{key}codes"], book, rows * cols).view(rows, cols)
    values.mul_(row.view(-1, 1))
    if col is not None:
        values.mul_(col.view(1, -1))
    values = values.view(-1)
    if f"{key}zero" in enc.streams:
        values.masked_fill_(pack.unpack_mask(enc.streams[f"{key}zero"], rows * cols).to(device), 0.0)
    return values


def _decode_second(enc: Encoded, key: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows, cols = _matrix(shape)
    row = enc.streams[f"{key}row"].view(torch.float32)
    col = enc.streams[f"{key}col"].view(torch.float32) if f"{key}col" in enc.streams else None
    return _second_values(enc, key, row, col, rows, cols, device)


def _encode_first(enc: Encoded, m: torch.Tensor, v_hat: torch.Tensor, step: float) -> None:
    """Code m as m / √v̂ in dithered levels ``step`` apart (0 where v̂ is 0); the step
    doubles until every level fits in ±127."""
    direction = v_hat.sqrt()
    torch.div(m.float(), direction, out=direction)
    direction.masked_fill_(v_hat == 0, 0.0)
    step, levels = _fitting_step(direction, step)
    direction.mul_(1.0 / step)
    enc.streams["mcodes"] = _dithered_digits(direction, levels, enc.meta["dither"] + 1)
    enc.meta["mstep"], enc.meta["mlevels"] = step, levels


def _decode_first(enc: Encoded, v_hat: torch.Tensor) -> torch.Tensor:
    """m̂ = (k − u) · step · √v̂."""
    values = _undithered(enc.streams["mcodes"], enc.meta["mlevels"], v_hat.numel(), enc.meta["dither"] + 1,
                         v_hat.device)
    return values.mul_(np.float32(enc.meta["mstep"])).mul_(v_hat.sqrt())


def _fitting_step(x: torch.Tensor, step: float) -> tuple[float, int]:
    """``step``, doubled until round(x/step ± ½) fits in ±127; and the levels needed."""
    peak = 0.0
    if x.numel():
        low, high = torch.aminmax(x)
        peak = max(-float(low), float(high))
    while math.ceil(peak / step + 0.5) > uniform.MAX_LEVEL:
        step *= 2
    return step, math.ceil(peak / step + 0.5)


def _dither(start: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """u ∈ [−½, ½) in steps of 2^−12 for positions start..start+count: an integer hash
    of the position and ``seed`` (no product exceeds 2^63, so every device computes the
    same bits), then 12 of its bits. Exact in float32, and so is k − u for |k| < 2^11."""
    x = torch.arange(start, start + count, dtype=torch.int64, device=device) & 0x7FFFFFFF
    x = (x * 0x9E3779B1 + ((seed & 0xFFFFFFFF) * 0x85EBCA77 & 0xFFFFFFFF)) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return (x >> 20).to(torch.float32).mul_(1.0 / 4096).sub_(0.5)


def _dithered_digits(x: torch.Tensor, levels: int, seed: int, grid: Grid | None | bool = True,
                     ) -> torch.Tensor:
    """Digits round(x + u) + levels, a block at a time (``x`` is overwritten), grouped.
    u at every position (``grid`` True), none (None), or off the grid's untouched ones."""
    for start in range(0, x.numel(), BLOCK):
        part = x[start:start + BLOCK]
        part.add_(_grid_dither(start, part.numel(), seed, x.device, grid)).round_().clamp_(-levels, levels)
    digits = x.add_(levels).to(torch.uint8)
    return uniform.pack_digits(digits, levels)


def _undithered(packed: torch.Tensor, levels: int, n: int, seed: int, device: torch.device,
                grid: Grid | None | bool = True) -> torch.Tensor:
    """k − u per position, float32 (exact); ``grid`` as for :func:`_dithered_digits`."""
    book = torch.arange(-levels, levels + 1, dtype=torch.float32, device=device)
    values = uniform.values(packed, book, n).to(device)
    for start in range(0, n, BLOCK):
        part = values[start:start + BLOCK]
        part.sub_(_grid_dither(start, part.numel(), seed, device, grid))
    return values


def _grid_dither(start: int, count: int, seed: int, device: torch.device,
                 grid: Grid | None | bool) -> torch.Tensor | float:
    if grid is None:
        return 0.0
    u = _dither(start, count, seed, device)
    return u if grid is True else u.masked_fill_(grid.digits[start:start + count] == UNTOUCHED, 0.0)


def _geometric_mean(v_hat: torch.Tensor) -> float:
    """The geometric mean of v̂'s positive values in the fixed strided sample, as a
    float32 value (0 when there are none): the v at which the step is exactly q."""
    sample = strided_sample(v_hat)
    positive = sample[sample > 0]
    return float(np.float32(np.exp(np.log(positive).mean()))) if positive.size else 0.0


def _shift(v_hat: torch.Tensor, ref: float) -> torch.Tensor:
    """Per-position step exponent s = round(log2(v̂ / ref) / 4), clamped to
    [−``COARSER``, ``FINER``], as uint8 digits s + ``COARSER``; exact: read from the
    float32 exponent of v̂ / ref. ``UNTOUCHED`` where v̂ is 0; s = 0 everywhere if ref is."""
    if ref <= 0:
        return torch.full((v_hat.numel(),), COARSER, dtype=torch.uint8, device=v_hat.device)
    exponent = (v_hat / np.float32(ref)).view(torch.int32)
    exponent.bitwise_right_shift_(23).sub_(126)  # frexp's exponent: v̂/ref = f·2^e, f in [0.5, 1)
    shift = exponent.add_(1).div_(4, rounding_mode="floor").clamp_(-COARSER, FINER)
    return shift.add_(COARSER).to(torch.uint8).masked_fill_(v_hat == 0, UNTOUCHED)


def _encode_weight(enc: Encoded, delta: torch.Tensor, q: float | Callable[[torch.Tensor], float],
                   grid: Grid | None) -> torch.Tensor:
    """Code ΔW · 2^s / q, overwriting ``delta`` (the only reference to it, so it is
    freed before the reconstruction is made); returns the decoded ΔŴ (float32). ``q``
    may be a function of ΔW. Up to ±127 levels the codes are dithered and grouped;
    beyond (keyframes, mostly) they are wide integers, q being far below the values."""
    n, device = delta.numel(), delta.device
    q = q(delta) if callable(q) else q
    enc.meta["q"] = q
    if q == 0.0:
        enc.streams["wcodes"] = torch.empty(0, dtype=torch.uint8, device=device)
        enc.meta["wlevels"] = 0
        return torch.zeros(n, dtype=torch.float32, device=device)
    _scale(delta, grid, 1)
    delta.mul_(1.0 / q)
    peak = 0.0
    if n:
        low, high = torch.aminmax(delta)
        peak = max(-float(low), float(high))
    if peak >= EXACT_INTEGERS:  # a step far below the values: widen it so codes stay exact
        widen = 2.0 ** math.ceil(math.log2(peak / (EXACT_INTEGERS / 2)))
        enc.meta["q"] = float(np.float32(q * widen))
        delta.mul_(1.0 / widen)
        peak /= widen
    levels = math.ceil(peak + 0.5)
    if levels <= uniform.MAX_LEVEL:
        enc.streams["wcodes"] = _dithered_digits(delta, levels, enc.meta["dither"], grid)
        del delta
        enc.meta["wlevels"] = levels
    else:
        width = 2 if levels < (1 << 15) else 4
        codes = delta.round_().to(torch.int32)
        del delta
        zigzag = (codes << 1) ^ (codes >> 31)
        del codes
        enc.streams["wcodes"] = pack.to_planes(zigzag.to(torch.int16) if width == 2 else zigzag)
        del zigzag
        enc.meta["wide"] = width
    return _decode_weight(enc, n, grid, device)


def _decode_weight(enc: Encoded, n: int, grid: Grid | None, device: torch.device) -> torch.Tensor:
    """ΔŴ = (k − u) · q · 2^−s (narrow; u = 0 at the grid's untouched positions, and
    everywhere for a weight without v) or k · q · 2^−s (wide)."""
    wide = enc.meta.get("wide")
    if wide is None:
        values = _undithered(enc.streams["wcodes"], enc.meta["wlevels"], n, enc.meta["dither"], device, grid)
    else:
        zigzag = pack.from_planes(enc.streams["wcodes"], torch.int16 if wide == 2 else torch.int32, (n,))
        zigzag = zigzag.to(torch.int32) & (0xFFFF if wide == 2 else -1)
        values = ((zigzag >> 1) ^ -(zigzag & 1)).float()
    values.mul_(np.float32(enc.meta["q"]))
    _scale(values, grid, -1)
    return values


def _scale(x: torch.Tensor, grid: Grid | None, sign: int) -> None:
    """x ·= 2^(sign·s) in place, a block at a time (exact: powers of two)."""
    if grid is None:
        return
    exponents = sign * np.append(np.arange(COARSER + FINER + 1) - COARSER, 0)  # UNTOUCHED: s = 0
    table = torch.from_numpy(np.ldexp(np.float32(1), exponents).astype(np.float32)).to(x.device)
    for start in range(0, x.numel(), BLOCK):
        x[start:start + BLOCK].mul_(pack.lookup(table, grid.digits[start:start + BLOCK]))


def _add(base: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """Ŵ = base + ΔŴ, shared by encoder and decoder so the closed loop sees exactly
    what restore gives."""
    return values if base is None else values.add_(base)
