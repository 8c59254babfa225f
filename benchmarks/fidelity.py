"""Resume fidelity over the grid of training regimes (excp.bench.fidelity).

    python benchmarks/fidelity.py --json fidelity.json              # the whole grid
    python benchmarks/fidelity.py --regimes base --presets default paper
    python benchmarks/fidelity.py --presets --control --regimes base     # the bf16 control alone
    python benchmarks/fidelity.py --regimes base --set step4:lr_step=4 step16:lr_step=16
    python benchmarks/fidelity.py --table fidelity.json                 # its markdown table

Prints progress and each figure as it is measured; writes every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from excp.bench import fidelity
from excp.codec.params import PRESETS, CodecParams

HF = "minilm"  # the Hugging Face fine-tune (needs the bench extra: pip install -e '.[bench]')


def _custom(spec: str) -> tuple[str, CodecParams]:
    """``name:key=value,key=value`` on top of the default preset."""
    name, _, assignments = spec.partition(":")
    changes = {}
    for pair in filter(None, assignments.split(",")):
        key, _, value = pair.partition("=")
        changes[key] = type(getattr(CodecParams(), key))(value)
    return name, PRESETS["default"].replace(**changes)


def main() -> None:
    names = [r.name for r in fidelity.GRID] + [fidelity.SLICE.name, HF]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", nargs="*", default=[r.name for r in fidelity.GRID] + [HF], choices=names)
    parser.add_argument("--presets", nargs="*", default=["default", "max"], choices=list(PRESETS))
    parser.add_argument("--set", nargs="*", default=[], help="extra codecs: name:key=value,key=value")
    parser.add_argument("--control", action="store_true",
                        help="also run the bf16 control: weights rounded to bfloat16, no codec "
                             "(GPT regimes only)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=None, metavar="JSON", help="print the table of a finished grid")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as done:
            print(fidelity.table(json.load(done)["results"]))
        return
    torch.set_num_threads(2)
    presets = {name: PRESETS[name] for name in args.presets}
    presets.update(_custom(spec) for spec in args.set)
    if args.control:
        presets[fidelity.CONTROL] = None
    regimes = {r.name: r for r in [*fidelity.GRID, fidelity.SLICE]}
    start, results = time.time(), []
    log = lambda line: print(line, flush=True)  # noqa: E731
    for name in args.regimes:
        if name == HF:
            from excp.bench.fidelity_hf import HFRegime, run_hf_regime

            codecs = {k: v for k, v in presets.items() if v is not None}
            results.append(run_hf_regime(HFRegime(), codecs, log))
        else:
            results.append(fidelity.run_regime(regimes[name], presets, log))
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"results": results, "seconds": time.time() - start}, out, indent=1)
    print(f"grid done in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
