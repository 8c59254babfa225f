"""Encode / decode throughput of excp, end to end through the archive format.

Builds a synthetic checkpoint with AdamW state (weights, exp_avg, exp_avg_sq) whose
statistics resemble a real run 100 steps after its parent, pushes the parent
(keyframe) and the child (a link) to a local store, and times:

* encode: Bundle of the child -> archive committed in the store (chain.push);
* decode: archive in the store -> tensors of the child, given the parent's
  reconstruction (what a restore of a link costs on top of its parent).

Parameters/s counts weights only (each with its two moments), as the targets do.

    python benchmarks/speed.py --params 64e6 --tensor 4e6 --preset default
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; read when torch loads

import argparse
import json
import tempfile
import time

import torch

from excp import memory
from excp.bundle import Bundle, Role, TensorEntry, moment_name
from excp.chain import Chain
from excp.codec.params import PRESETS
from excp.store import LocalStore


def synthetic(params: int, tensor: int, seed: int,
              device: str | torch.device = "cpu") -> tuple[Bundle, Bundle]:
    """A parent and a child checkpoint, 100 training steps apart, made on ``device``."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=device)

    parent, child = Bundle("state_dict", step=100), Bundle("state_dict", step=200)
    cols = 1024
    for i in range(max(1, params // tensor)):
        shape = (tensor // cols, cols)
        name = f"layer{i}.weight"
        w0 = randn(*shape) * 0.02
        scale = rand(shape[0], 1) * rand(1, cols)
        v = (scale * 1e-7) * torch.exp(randn(*shape))
        m = randn(*shape) * v.sqrt() * 0.3
        step = randn(*shape) * 4e-4 * torch.exp(randn(*shape) * 0.5)
        for bundle, w in ((parent, w0), (child, w0 + step)):
            bundle.add(TensorEntry(name, Role.WEIGHT, w))
            bundle.add(TensorEntry(moment_name(name, Role.EXP_AVG), Role.EXP_AVG, m.clone(), name))
            bundle.add(TensorEntry(moment_name(name, Role.EXP_AVG_SQ), Role.EXP_AVG_SQ, v.clone(), name))
    return parent, child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=64e6)
    parser.add_argument("--tensor", type=float, default=4e6)
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (the CLI and server tune it)")
    args = parser.parse_args()
    if not args.default_allocator:
        memory.tune_allocator()
    parent, child = synthetic(int(args.params), int(args.tensor), seed=0)
    n = child.num_parameters()
    encode_s, decode_s = [], []
    with tempfile.TemporaryDirectory() as root:
        for attempt in range(args.repeat):
            chain = Chain(LocalStore(root), f"speed{attempt}")
            chain.create(PRESETS[args.preset].replace(keyframe_every=0), None)
            _, recon = chain.push(parent, 100, lambda head: {})
            start = time.perf_counter()
            result, _ = chain.push(child, 200, lambda head, parent=recon: parent)
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            chain.read(result.commit, recon, "cpu", weights_only=False)
            decode_s.append(time.perf_counter() - start)
    commit = result.commit
    figures = {
        "parameters": n, "preset": args.preset, "threads": torch.get_num_threads(),
        "encode_s": min(encode_s), "decode_s": min(decode_s),
        "encode_Mparams_s": n / min(encode_s) / 1e6, "decode_Mparams_s": n / min(decode_s) / 1e6,
        "ratio": commit.ratio, "bits_per_param": 8 * commit.size / n,
    }
    print(f"{n / 1e6:.0f}M parameters (+ 2 moments each), preset {args.preset}, "
          f"{torch.get_num_threads()} threads: encode {figures['encode_Mparams_s']:.0f} M params/s, "
          f"decode {figures['decode_Mparams_s']:.0f} M params/s, link ratio {commit.ratio:.1f}x "
          f"({figures['bits_per_param']:.2f} bits/param)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
