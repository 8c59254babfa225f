"""The ExCP link: one weight and its Adam moments, coded against the parent's
reconstruction.

A *link* sends the residual ΔW = W − Ŵ_parent at the positions pruning keeps, as
codes into a k-means codebook; a *keyframe* is the same with Ŵ_parent = 0, every
non-zero weight kept and a finer codebook. The closed loop is kept by construction:
the encoder returns exactly what the decoder will compute (both call
:func:`_reconstruct`), and the chain feeds that reconstruction to the next link.

Streams of a unit (all uint8):

``mask``   packed bitmask over the weight's n positions: ΔW sent here;
``wcodes`` one code per sent position into ``wbook`` (float32 centroids);
``mmask``  packed bitmask over the *sent* positions: moments kept here (the moment
           mask is a subset of the weight mask, so it is coded conditionally);
``mcodes``/``mbook``, ``vcodes``/``vbook`` (and ``xcodes``/``xbook`` for amsgrad's
           max_exp_avg_sq): codes and codebooks of the kept moments.
Everything not kept restores as zero.
"""

from __future__ import annotations

import torch

from excp.bundle import Role
from excp.codec import kmeans
from excp.codec.pack import pack_mask, unpack_mask
from excp.codec.params import CodecParams
from excp.codec.prune import moment_mask, weight_threshold
from excp.codec.types import Encoded
from excp.errors import InvalidInput

_MOMENT_STREAM = {Role.EXP_AVG: "m", Role.EXP_AVG_SQ: "v", Role.MAX_EXP_AVG_SQ: "x"}


def _book_bytes(codebook: torch.Tensor) -> torch.Tensor:
    return codebook.contiguous().view(torch.uint8)


def _book(stream: torch.Tensor) -> torch.Tensor:
    return stream.view(torch.float32)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        count = int((~torch.isfinite(t)).sum())
        raise InvalidInput(
            f"tensor {name!r} has {count} NaN/Inf values: lossy coding needs finite values; "
            "fix the training run or push with --mode lossless"
        )


def encode_unit(name: str, weight: torch.Tensor, parent: torch.Tensor | None,
                moments: dict[Role, torch.Tensor], params: CodecParams,
                keyframe: bool) -> tuple[Encoded, dict[Role, torch.Tensor]]:
    """Code one weight and its moments; returns the unit and its reconstruction
    (role → tensor in the input's dtype and shape)."""
    for role, t in [(Role.WEIGHT, weight), *moments.items()]:
        _check_finite(f"{name} ({role.value})", t)
    w = weight.reshape(-1).float()
    base = torch.zeros_like(w) if parent is None else parent.reshape(-1).float()
    delta = w - base
    v = moments.get(Role.EXP_AVG_SQ)
    if keyframe:
        sent = delta != 0
        bits = params.keyframe_bits
    else:
        threshold = weight_threshold(delta, None if v is None else v.reshape(-1), params)
        sent = delta.abs() > threshold
        bits = params.weight_bits
    q = kmeans.quantize(delta[sent], (1 << bits) - 1)
    enc = Encoded(meta={"keyframe": keyframe, "sent": int(q.codes.numel())})
    enc.streams = {"mask": pack_mask(sent), "wcodes": q.codes, "wbook": _book_bytes(q.codebook)}
    if Role.EXP_AVG in moments and v is not None:
        m = moments[Role.EXP_AVG].reshape(-1)
        kept = moment_mask(m, v.reshape(-1), sent, params)
        enc.streams["mmask"] = pack_mask(kept[sent])
        enc.meta["moments"] = int(kept.sum())
        bits = (1 << params.moment_bits) - 1
        for role, moment in moments.items():
            values = moment.reshape(-1)[kept].float()
            if role is Role.EXP_AVG:
                scale = float(values.abs().min()) if values.numel() else 1.0
                domain = kmeans.Domain("asinh", scale or 1.0)
            else:
                domain = kmeans.Domain("log")
            mq = kmeans.quantize(values, bits, domain)
            key = _MOMENT_STREAM[role]
            enc.streams[f"{key}codes"] = mq.codes
            enc.streams[f"{key}book"] = _book_bytes(mq.codebook)
    dtypes = {Role.WEIGHT: weight.dtype, **{r: t.dtype for r, t in moments.items()}}
    recon = _reconstruct(enc, base, sent, dtypes, tuple(weight.shape))
    return enc, recon


def decode_unit(enc: Encoded, parent: torch.Tensor | None, dtypes: dict[Role, torch.dtype],
                shape: tuple[int, ...], device: torch.device) -> dict[Role, torch.Tensor]:
    n = 1
    for d in shape:
        n *= d
    base = torch.zeros(n, dtype=torch.float32, device=device) if parent is None \
        else parent.reshape(-1).float()
    sent = unpack_mask(enc.streams["mask"], n)
    return _reconstruct(enc, base, sent, dtypes, shape)


def _reconstruct(enc: Encoded, base: torch.Tensor, sent: torch.Tensor,
                 dtypes: dict[Role, torch.dtype], shape: tuple[int, ...]) -> dict[Role, torch.Tensor]:
    """Ŵ = base + codebook[code] at sent positions; moments at their kept positions.

    Shared by encoder and decoder so the closed loop sees exactly what restore gives.
    """
    streams = enc.streams
    w = base.clone()
    w[sent] += _book(streams["wbook"])[streams["wcodes"].long()]
    out = {Role.WEIGHT: w.to(dtypes[Role.WEIGHT]).view(shape)}
    moment_roles = [r for r in dtypes if r is not Role.WEIGHT]
    if not moment_roles:
        return out
    kept = torch.zeros_like(sent)
    if "mmask" in streams:
        kept[sent] = unpack_mask(streams["mmask"], int(enc.meta["sent"]))
    for role in moment_roles:
        key = _MOMENT_STREAM[role]
        values = torch.zeros(base.numel(), dtype=torch.float32, device=base.device)
        if f"{key}codes" in streams:
            values[kept] = _book(streams[f"{key}book"])[streams[f"{key}codes"].long()]
        out[role] = values.to(dtypes[role]).view(shape)
    if Role.EXP_AVG in out and Role.EXP_AVG_SQ in out:
        no_v = out[Role.EXP_AVG_SQ] == 0
        out[Role.EXP_AVG] = out[Role.EXP_AVG].masked_fill(no_v, 0)
    return out
