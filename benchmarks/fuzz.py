"""A long fuzzing campaign over excp's decoders: the properties of tests/fuzz, with
random seeds, ``--rounds`` times ``--examples`` examples each. Prints, per property,
the examples run and the failures found (a failure is kept by hypothesis's output:
turn it into a file under tests/fuzz/regressions and fix the reader).

    python benchmarks/fuzz.py --rounds 10 --examples 2000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<test>\S+::\S+):$")
COUNTS = re.compile(r"(?P<passing>\d+) passing examples, (?P<failing>\d+) failing examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    passing, failing = Counter(), Counter()
    start = time.perf_counter()
    env = {**os.environ, "EXCP_FUZZ_RANDOM": "1", "EXCP_FUZZ_EXAMPLES": str(args.examples)}
    for _ in range(args.rounds):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz",
                   "--hypothesis-show-statistics"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        test = None
        for line in done.stdout.splitlines():
            if (match := LINE.match(line.strip())) is not None:
                test = match.group("test").split("::")[-1]
            elif test and (counts := COUNTS.search(line)) is not None:
                passing[test] += int(counts.group("passing"))
                failing[test] += int(counts.group("failing"))
                test = None
        if done.returncode != 0:
            print(done.stdout[-4000:], file=sys.stderr)
    report = {"rounds": args.rounds, "seconds": round(time.perf_counter() - start),
              "properties": {t: {"examples": passing[t] + failing[t], "failing": failing[t]}
                             for t in passing}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
