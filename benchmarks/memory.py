"""The encoder's extra memory for one weight with its Adam moments: how much a training
job must leave free beside its state for excp to code a link.

Codes one tensor of ``--elements`` (fp32 weight, parent reconstruction, m, v, made
first) and reports the process's peak resident memory above what the inputs took, per
element. The encoder works tensor by tensor, so this bounds its working set for a whole
checkpoint: (the largest tensor's elements) × this figure, of which 4 bytes per element
are the reconstruction it returns (the parent of the next link, kept for every tensor).
``--torch-path`` runs the torch formulation a GPU runs instead of the CPU's numpy paths.
Linux and glibc only: the peak is the process's own (``VmHWM``, reset before coding),
and glibc is told to hand every freed block back at once, so that memory the inputs'
temporaries freed is not reused unseen.

    python benchmarks/memory.py --elements 32e6 --preset default --torch-path
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from excp import memory
from excp.bundle import Role
from excp.codec import pack
from excp.codec.params import PRESETS
from excp.codec.pipeline import encode_unit


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory figure, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status: this script needs Linux")


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh from the current RSS (Linux: clear_refs 5), so the
    temporaries that made the inputs do not hide the encoder's own peak."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=float, default=32e6)
    parser.add_argument("--preset", default="default", choices=[p for p in PRESETS if p != "lossless"])
    parser.add_argument("--torch-path", action="store_true")
    args = parser.parse_args()
    if not memory.tune_allocator(64 << 10):
        raise SystemExit("this measurement needs glibc: it hands every freed block back (mallopt)")
    if args.torch_path:
        pack.numpy_path = lambda _: False
    n = int(args.elements) // 1024 * 1024  # a matrix of 1,024 columns
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen) * 0.02
    w = base + torch.randn(n, generator=gen) * 4e-4
    v = torch.rand(n, generator=gen) * 1e-7
    m = torch.randn(n, generator=gen) * v.sqrt() * 0.3
    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    moments = {Role.EXP_AVG: m.view(-1, 1024), Role.EXP_AVG_SQ: v.view(-1, 1024)}
    _, enc, _ = encode_unit("w", w.view(-1, 1024), base.view(-1, 1024), moments, PRESETS[args.preset], False,
                            lr=1e-4)
    extra = _status("VmHWM") - before
    streams = sum(t.numel() for t in enc.streams.values())
    print(json.dumps({"elements": n, "preset": args.preset, "torch_path": args.torch_path,
                      "extra_bytes": extra, "bytes_per_element": round(extra / n, 2),
                      "stream_bytes_per_element": round(streams / n, 3)}))


if __name__ == "__main__":
    main()
