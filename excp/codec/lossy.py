"""The ExCP link: one weight and its Adam moments, coded against the parent's
reconstruction.

A *link* sends the residual ΔW = W − Ŵ_parent at the positions pruning keeps, as
codes into a k-means codebook; a *keyframe* is the same with Ŵ_parent = 0, every
non-zero weight kept and a finer codebook. The closed loop is kept by construction:
the encoder returns exactly what the decoder will compute (both call
:func:`_weight`), and the chain feeds that reconstruction to the next link.

Streams of a unit (all uint8):

``mask``   packed bitmask over the weight's n positions: ΔW sent here;
``wcodes`` one code per sent position into ``wbook`` (float32 centroids);
``mmask``  packed bitmask over the *sent* positions: moments kept here (the moment
           mask is a subset of the weight mask, so it is coded conditionally);
``mcodes``/``mbook``, ``vcodes``/``vbook`` (and ``xcodes``/``xbook`` for amsgrad's
           max_exp_avg_sq): codes and codebooks of the kept moments.
Everything not kept restores as zero. (A rank-1 estimate of v filling the positions not
kept was measured and lost: with m = 0 there, an underestimated v makes larger steps
than Adam restarting from v = 0 does.)
"""

from __future__ import annotations

import torch

from excp.bundle import Role
from excp.codec import kmeans, uniform
from excp.codec.pack import flatnonzero, lookup, pack_mask, unpack_mask
from excp.codec.params import CodecParams
from excp.codec.prune import moment_threshold, weight_threshold
from excp.codec.types import Encoded
from excp.errors import InvalidInput

_MOMENT_STREAM = {Role.EXP_AVG: "m", Role.EXP_AVG_SQ: "v", Role.MAX_EXP_AVG_SQ: "x"}


def _book_bytes(codebook: torch.Tensor) -> torch.Tensor:
    return codebook.contiguous().view(torch.uint8)


def _book(stream: torch.Tensor) -> torch.Tensor:
    return stream.view(torch.float32)


def check_finite(name: str, weight: torch.Tensor, moments: dict[Role, torch.Tensor]) -> None:
    """Lossy coding needs finite values. A NaN or Inf makes the sum non-finite, so the
    full check runs only then (or when a finite tensor's float32 sum overflows, which
    then still passes the full check)."""
    for role, t in [(Role.WEIGHT, weight), *moments.items()]:
        if bool(torch.isfinite(t.sum(dtype=torch.float32))):
            continue
        count = int((~torch.isfinite(t)).sum())
        if count:
            raise InvalidInput(
                f"tensor {name!r} ({role.value}) has {count} NaN/Inf values: lossy coding needs finite "
                "values; fix the training run or push with --mode lossless"
            )


def encode_unit(weight: torch.Tensor, parent: torch.Tensor | None,
                moments: dict[Role, torch.Tensor], params: CodecParams,
                keyframe: bool) -> tuple[Encoded, torch.Tensor]:
    """Code one weight and its moments; returns the unit and the weight's
    reconstruction (the input's dtype and shape), which the next link is coded against."""
    w = weight.reshape(-1).float()
    base = None if parent is None else parent.reshape(-1).float()
    delta = w if base is None else w - base
    v = moments.get(Role.EXP_AVG_SQ)
    if params.weight_rule == "uniform":
        enc, positions, values = _encode_uniform(delta, params, keyframe)
    else:
        enc, positions, values = _encode_pruned(delta, None if v is None else v.reshape(-1), params,
                                                keyframe)
    del delta  # 4 bytes per element less while the moments are coded (benchmarks/memory.py)
    if Role.EXP_AVG in moments and v is not None:
        _encode_moments(enc, positions, moments, params)
    recon = _weight(base, positions, values, w.numel(), w.device)
    return enc, recon.to(weight.dtype).view(weight.shape)


def _encode_pruned(delta: torch.Tensor, v: torch.Tensor | None, params: CodecParams,
                   keyframe: bool) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
    """The paper's scheme: a mask of the residuals kept, k-means codes for them.
    Returns the unit, the sent positions and their decoded values."""
    if keyframe:
        sent = delta != 0
        bits = params.keyframe_bits
    else:
        sent = delta.abs() > weight_threshold(delta, v, params)
        bits = params.weight_bits
    positions = flatnonzero(sent)
    q = kmeans.quantize(delta.index_select(0, positions), 1 << bits)
    enc = Encoded(meta={"keyframe": keyframe, "sent": positions.numel()})
    enc.streams = {"mask": pack_mask(sent), "wcodes": q.codes, "wbook": _book_bytes(q.codebook)}
    return enc, positions, lookup(q.codebook, q.codes)


def _encode_uniform(delta: torch.Tensor, params: CodecParams,
                    keyframe: bool) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
    """Dense uniform codes for every position (code 0: not sent). Returns the unit,
    the sent positions and the decoded values of every position."""
    q = uniform.quantize(delta, params.keyframe_step if keyframe else params.weight_step)
    values = uniform.values(q.packed, q.book, q.n)
    positions = flatnonzero(values != 0)
    enc = Encoded(meta={"keyframe": keyframe, "sent": positions.numel(), "dense": True})
    enc.streams = {"wcodes": q.packed, "wbook": _book_bytes(q.book)}
    return enc, positions, values


def _encode_moments(enc: Encoded, positions: torch.Tensor, moments: dict[Role, torch.Tensor],
                    params: CodecParams) -> None:
    """Keep m and v where ΔW was sent, |m| > beta·mean|m| and v > 0; quantize them
    (m in the signed-log domain, v and max_v in the log domain)."""
    m = moments[Role.EXP_AVG].reshape(-1)
    v = moments[Role.EXP_AVG_SQ].reshape(-1)
    threshold = moment_threshold(m, params)
    m_sent, v_sent = m.index_select(0, positions), v.index_select(0, positions)
    kept = (m_sent.abs() > threshold) & (v_sent > 0)
    local = flatnonzero(kept)
    enc.streams["mmask"] = pack_mask(kept)
    enc.meta["moments"] = local.numel()
    where = positions.index_select(0, local)
    levels = 1 << params.moment_bits
    for role, moment in moments.items():
        values = moment.reshape(-1).index_select(0, where).float()
        if role is Role.EXP_AVG:
            domain = kmeans.Domain("slog", threshold or float(values.abs().max()) or 1.0)
        else:
            domain = kmeans.Domain("log")
        mq = kmeans.quantize(values, levels, domain)
        key = _MOMENT_STREAM[role]
        enc.streams[f"{key}codes"] = mq.codes
        enc.streams[f"{key}book"] = _book_bytes(mq.codebook)


def _weight(base: torch.Tensor | None, positions: torch.Tensor, values: torch.Tensor, n: int,
            device: torch.device) -> torch.Tensor:
    """Ŵ = base + values (float32): ``values`` are either dense (one per position, and
    then added to in place: the output is the one fresh tensor) or at ``positions``.
    Shared by encoder and decoder so the closed loop sees exactly what restore gives."""
    if values.numel() == n:
        return values if base is None else values.add_(base)
    out = torch.zeros(n, dtype=torch.float32, device=device) if base is None else base.clone()
    return out.index_add_(0, positions, values)


def decode_unit(enc: Encoded, parent: torch.Tensor | None, dtypes: dict[Role, torch.dtype],
                shape: tuple[int, ...], device: torch.device) -> dict[Role, torch.Tensor]:
    n = 1
    for d in shape:
        n *= d
    streams = enc.streams
    base = None if parent is None else parent.reshape(-1).float()
    moment_roles = [r for r in dtypes if r is not Role.WEIGHT]
    if enc.meta.get("dense"):
        values = uniform.values(streams["wcodes"], _book(streams["wbook"]), n)
        positions = flatnonzero(values != 0) if moment_roles else values.new_empty(0, dtype=torch.int64)
    else:
        positions = flatnonzero(unpack_mask(streams["mask"], n))
        values = lookup(_book(streams["wbook"]), streams["wcodes"])
    w = _weight(base, positions, values, n, device)
    out = {Role.WEIGHT: w.to(dtypes[Role.WEIGHT]).view(shape)}
    if not moment_roles:
        return out
    kept = positions.new_empty(0)
    if "mmask" in streams:
        kept = positions.index_select(0, flatnonzero(unpack_mask(streams["mmask"], positions.numel())))
    for role in moment_roles:
        key = _MOMENT_STREAM[role]
        values = torch.zeros(n, dtype=dtypes[role], device=device)
        if f"{key}codes" in streams:
            decoded = lookup(_book(streams[f"{key}book"]), streams[f"{key}codes"])
            values.index_copy_(0, kept, decoded.to(dtypes[role]))
        out[role] = values.view(shape)
    if Role.EXP_AVG in out and Role.EXP_AVG_SQ in out:
        v_kept = out[Role.EXP_AVG_SQ].view(-1).index_select(0, kept)
        flushed = kept.index_select(0, flatnonzero(v_kept == 0))
        out[Role.EXP_AVG].view(-1).index_fill_(0, flushed, 0)
    return out
