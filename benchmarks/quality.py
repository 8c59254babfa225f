"""Closed-loop quality of codec presets on a real training run.

Trains the workload's GPT with AdamW, pushes a checkpoint every ``--every`` steps
through excp (memory store, the hook's in-memory closed loop) and resumes training
from each reconstruction, so compression error feeds back into training. Prints, per
preset, the ratio against fp32 weights + moments, bits per parameter, and the final
eval loss against the uncompressed run.

    python benchmarks/quality.py --config small --steps 1200 --every 100 --presets paper default
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from excp import api
from excp.chain import Head
from excp.codec.params import PRESETS, CodecParams
from excp.store import MemoryStore
from excp.workload.train import run_chain


def closed_loop(params: CodecParams | None, args: argparse.Namespace) -> dict:
    store = MemoryStore()
    state = {"recon": None, "raw": 0, "stored": 0, "params": 0}

    def on_checkpoint(step: int, ckpt: dict) -> dict | None:
        if params is None:
            return None
        result, recon = api.push(ckpt, "q", store=store, params=params, parent=state["recon"])
        state["recon"] = Head(result.commit, recon)
        state.setdefault("links", []).append(8 * result.commit.size / result.commit.num_parameters)
        state["raw"] += result.commit.raw_bytes
        state["stored"] += result.commit.size
        state["params"] += result.commit.num_parameters
        return api.load_dict(api.restore("q", step, store=store))

    start = time.time()
    result = run_chain(args.config, args.steps, args.every, args.seed, on_checkpoint)
    out = {"final_loss": result.curve[-1][1], "curve": result.curve, "seconds": time.time() - start}
    if params is not None:
        out.update(ratio=state["raw"] / state["stored"], bits_per_param=8 * state["stored"] / state["params"],
                   bits_per_link=state["links"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="*", default=["paper", "default"])
    parser.add_argument("--set", nargs="*", default=[], help="extra: name:key=value,key=value")
    parser.add_argument("--reference-loss", type=float, default=None,
                        help="final loss of the uncompressed run, if already measured (skips it)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs: dict[str, CodecParams | None] = {} if args.reference_loss else {"uncompressed": None}
    configs.update({name: PRESETS[name] for name in args.presets})
    for spec in args.set:
        name, _, assignments = spec.partition(":")
        changes = {}
        for kv in assignments.split(","):
            key, _, value = kv.partition("=")
            changes[key] = type(getattr(CodecParams(), key))(value)
        configs[name] = PRESETS["default"].replace(**changes)
    results = {"uncompressed": {"final_loss": args.reference_loss}} if args.reference_loss else {}
    for name, params in configs.items():
        results[name] = closed_loop(params, args)
        base = results["uncompressed"]["final_loss"]
        r = results[name]
        extra = (f" ratio {r['ratio']:.1f}x  {r['bits_per_param']:.2f} bits/param (per link: "
                 f"{' '.join(f'{b:.2f}' for b in r['bits_per_link'])})") if "ratio" in r else ""
        print(f"{name:14s} final loss {r['final_loss']:.4f} ({100 * (r['final_loss'] / base - 1):+.2f}%)"
              f"{extra}  [{r['seconds']:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
