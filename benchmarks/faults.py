"""Storage faults: a seeded random plan of S3 faults under many pushes, restores,
verifies and gc runs, and outages of the store under a running service.

Between excp's S3 store and moto's S3 server sits ``tests/fault_proxy.py``: a share
``--rate`` of the requests fail, the kind drawn uniformly from S3's 500 InternalError,
503 SlowDown and 503 ServiceUnavailable, a connection dropped before the request or
after it took effect, an answer stalled past the client's read timeout, and a body
stalled or cut off midway. Each round runs one operation through ``excp.api`` on that
store — a push every other round (every fourth of them on a wide model whose keyframes
go up in multipart), else a restore, a verify or a gc — and counts it as succeeded
(with the faults it survived) or refused cleanly (an ExcpError; anything else stops
the campaign). Every push that returned must have its commit record, and a restore
through the faults must give the bytes the step restores to without them. Every fifth
round the fault-free view of the bucket is checked: each run verifies, and every
committed step restores exactly as it did the first time.

Then ``--outages`` cycles of an ``excp serve`` (a subprocess) whose store goes down
(every request answered 503, or every connection dropped): ``/readyz`` and an archive
upload must answer 503 ``store_unavailable`` (the seconds they take are reported),
nothing may commit; once the store is back the same server, never restarted, must be
ready and commit the same upload; and a client pushing while the store is down must
get there by its retries. Prints the counts as JSON; ``data_lost`` must be 0.

``--keep-exact K``: the campaign's runs keep exact copies of their newest K steps, so
faults also hit a push between its link's commit and its exact copy's archive, record
and the drop of the oldest copy. At every check and after the campaign (then after
``excp gc`` and ``excp verify`` on the fault-free view too): no exact record names a
missing archive, every step ``exact_steps`` lists restores to the content digest of
the checkpoint pushed for it, and at most K exact steps exist (K + 1 after a push
refused between its record and the drop, counted).

    python benchmarks/faults.py --rounds 30 --rate 0.3 --seed 0
    python benchmarks/faults.py --rounds 8 --keep-exact 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.copies import check_copies, pushed_digest  # noqa: E402
from excp import api  # noqa: E402
from excp.chain import Chain  # noqa: E402
from excp.client import Client  # noqa: E402
from excp.client.target import ServiceTarget  # noqa: E402
from excp.codec.exact import content_digest  # noqa: E402
from excp.codec.params import CodecParams  # noqa: E402
from excp.errors import ExcpError, NotFound  # noqa: E402
from excp.store.s3 import MIN_PART_SIZE, S3Store  # noqa: E402
from tests.conftest import TinyRun  # noqa: E402
from tests.fault_proxy import FaultProxy, coded_archive, proxied_backend  # noqa: E402
from tests.s3_fixtures import moto_server, moto_settings, new_bucket  # noqa: E402
from tests.serve_fixtures import TEAM_A, Server  # noqa: E402

OPERATIONS = ("push", "restore", "verify", "gc")
BETWEEN_PUSHES = ("restore", "restore", "verify", "gc")
"""What the odd rounds draw from (the even ones push)."""
WIDE = CodecParams(keyframe_every=2)
"""The wide run's options: a keyframe every other push, so its multipart uploads recur."""


class Wide:
    """An 8M-parameter MLP whose keyframes (about 6 MB) go up in multipart."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.GELU(),
                                         torch.nn.Linear(2048, 2048))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.data = torch.randn(32, 2048)

    def advance(self) -> dict:
        self.opt.zero_grad()
        self.model(self.data).square().mean().backward()
        self.opt.step()
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}


class Campaign:
    """The random plan against one faulty store, checked against the fault-free view."""

    def __init__(self, store: S3Store, clean: S3Store, proxy: FaultProxy, seed: int, keep: int) -> None:
        self.store, self.clean, self.proxy, self.keep = store, clean, proxy, keep
        self.rng = random.Random(seed)
        self.tiny = {"tiny-a": TinyRun(seed=seed), "tiny-b": TinyRun(seed=seed + 1)}
        self.wide = Wide(seed)
        self.steps: Counter[str] = Counter()
        self.committed: set[str] = set()  # the runs with a commit, which the other operations need
        self.truth: dict[tuple[str, int], str] = {}
        self.pushed: dict[tuple[str, int], str] = {}  # content digests an exact restore must give
        self.exact_seen: dict[tuple[str, int], str] = {}
        self.ops = {op: Counter(attempted=0, succeeded=0, survived_faults=0, refused_cleanly=0)
                    for op in OPERATIONS}
        self.counts: Counter[str] = Counter()

    def round(self, number: int) -> None:
        op = "push" if not self.committed or number % 2 == 0 else self.rng.choice(BETWEEN_PUSHES)
        if op == "push":
            run = "wide" if number % 8 == 0 else self.rng.choice(list(self.tiny))
        else:
            run = self.rng.choice(sorted(self.committed))
        before = self.proxy.faults()
        try:
            getattr(self, op)(run)
        except ExcpError as err:
            self.ops[op]["refused_cleanly"] += 1
            print(f"round {number}: {op} of {run} refused: [{err.code}] {err.message}", file=sys.stderr)
        else:
            self.ops[op]["succeeded"] += 1
            self.ops[op]["survived_faults"] += self.proxy.faults() > before
        self.ops[op]["attempted"] += 1

    def push(self, run: str) -> None:
        self.steps[run] += 10
        step = self.steps[run]
        checkpoint = self.wide.advance() if run == "wide" else self.tiny[run].advance(3)
        if self.keep:
            self.pushed[run, step] = pushed_digest(checkpoint)
        try:
            result, _ = api.push(checkpoint, run, step=step, store=self.store,
                                 params=WIDE if run == "wide" else None, keep_exact=self.keep or None)
        except ExcpError:
            if self._committed(run, step):  # the commit landed; only its answer was lost
                self.counts["committed_despite_error"] += 1
                self.committed.add(run)
            raise
        if not result.created or not self._committed(run, step):
            self.counts["data_lost"] += 1
            print(f"{run} step {step}: the push returned, but no commit record is stored", file=sys.stderr)
        self.committed.add(run)

    def restore(self, run: str) -> None:
        step = self.rng.choice([c.step for c in Chain(self.clean, run).commits()])
        digest = api.restore(run, step, store=self.store, lossy=bool(self.keep)).digest()
        if digest != self._truth(run, step):
            self.counts["data_lost"] += 1
            print(f"{run} step {step}: restored through faults to other bytes", file=sys.stderr)
        if self.keep and step in api.exact_steps(run, store=self.clean):
            exact = api.restore(run, step, store=self.store)
            self.counts["exact_restores_through_faults"] += 1
            if content_digest(exact) != self.pushed[run, step]:
                self.counts["data_lost"] += 1
                print(f"{run} step {step}: exact restore through faults is not the pushed", file=sys.stderr)

    def verify(self, run: str) -> None:
        api.verify(run, store=self.store)

    def gc(self, run: str) -> None:
        keys = api.gc(run, store=self.store).keys
        self.counts["gc_deleted"] += len(keys)
        self.counts["exact_archives_collected"] += sum("/exact/archives/" in key for key in keys)

    def check(self) -> None:
        """The fault-free view: every run verifies, and every committed step restores to
        the bytes it restored to first."""
        for run in (*self.tiny, "wide"):
            chain = Chain(self.clean, run)
            if not chain.exists():
                continue
            api.verify(run, store=self.clean)
            for commit, bundle in chain.replay():
                if self._truth(run, commit.step, bundle.digest()) != bundle.digest():
                    self.counts["data_lost"] += 1
                    print(f"{run} step {commit.step}: restores differently than before", file=sys.stderr)
                self.counts["steps_reverified"] += 1
            self.check_copies(run)

    def check_copies(self, run: str) -> None:
        """The exact-copy invariants of ``run`` on the fault-free view."""
        if not self.keep:
            return
        problems, excess = check_copies(self.clean, run, self.keep, self.pushed, self.exact_seen)
        for problem in problems:
            self.counts["data_lost"] += 1
            print(problem, file=sys.stderr)
        self.counts["checks_over_keep"] += excess
        self.counts["exact_steps_checked"] += len(api.exact_steps(run, store=self.clean))

    def final(self) -> None:
        """After the campaign, without faults: gc, then every run verifies and its exact
        copies hold; counts the newest K steps a refused push left without a copy."""
        keys = api.gc(store=self.clean).keys
        self.counts["gc_deleted"] += len(keys)
        self.counts["exact_archives_collected"] += sum("/exact/archives/" in key for key in keys)
        for run in (*self.tiny, "wide"):
            if not Chain(self.clean, run).exists():
                continue
            api.verify(run, store=self.clean)
            self.check_copies(run)
            if self.keep:
                newest = {c.step for c in Chain(self.clean, run).commits()[-self.keep:]}
                exact = set(api.exact_steps(run, store=self.clean))
                self.counts["newest_without_copy"] += len(newest - exact)

    def _truth(self, run: str, step: int, digest: str | None = None) -> str:
        """What ``step``'s link restored to the first time it was restored without faults
        (with exact copies kept, its lossy restore: an exact one is checked against what
        was pushed instead)."""
        if (run, step) not in self.truth:
            self.truth[run, step] = digest or api.restore(run, step, store=self.clean,
                                                          lossy=bool(self.keep)).digest()
        return self.truth[run, step]

    def _committed(self, run: str, step: int) -> bool:
        try:
            Chain(self.clean, run).commit(step)
        except NotFound:
            return False
        return True


def outage_cycle(server: Server, proxy: FaultProxy, cycle: int, counts: Counter[str],
                 slowest: Counter[str]) -> None:
    """One outage of the service's store (every request answered 503, or every other
    cycle every connection dropped): 503s while down, and how long they take; recovery
    without a restart; a client pushing through the outage by its retries."""
    kind = ("service_unavailable", "drop_before")[cycle % 2]
    run, tiny = f"team-a-outage-{cycle}", TinyRun(seed=100 + cycle)
    assert server.create(run).status_code == 201
    body, recon = coded_archive(server, run, tiny.advance(3), 10, None)
    assert server.put_archive(run, 10, body).status_code == 201
    body, recon = coded_archive(server, run, tiny.advance(3), 20, recon)
    proxy.outage(kind)
    for name, call in (("readyz", lambda: requests.get(server.url("/readyz"), timeout=600)),
                       ("push", lambda: server.put_archive(run, 20, body))):
        start = time.perf_counter()
        answer = call()
        slowest[f"{name}_503_seconds"] = max(slowest[f"{name}_503_seconds"], time.perf_counter() - start)
        if answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable":
            counts[f"{name}_503"] += 1
    proxy.restore()
    if [c.step for c in api.list_commits(run, server.store)] != [10]:
        counts["data_lost"] += 1
    if (requests.get(server.url("/readyz"), timeout=60).status_code == 200
            and server.put_archive(run, 20, body).status_code == 201
            and api.verify(run, store=server.store).checkpoints == 2):
        counts["recovered_without_restart"] += 1
    with ServiceTarget(Client(f"excp://127.0.0.1:{server.port}", TEAM_A, retries=10, backoff=1.0,
                              max_backoff=4.0)) as target:
        proxy.outage(kind)
        threading.Timer(8.0, proxy.restore).start()  # down for 8 s, mid-push
        try:
            result, _ = target.push(tiny.advance(3), run, step=30)
            counts["client_pushes_through_outage"] += result.created
        except ExcpError as err:
            print(f"client push through the outage failed: {err}", file=sys.stderr)
        if target.restore(run, 30).digest() != api.restore(run, 30, store=server.store).digest():
            counts["data_lost"] += 1
    counts["outages"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rate", type=float, default=0.3, help="share of S3 requests that fail")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outages", type=int, default=2, help="store outages under a running service")
    parser.add_argument("--keep-exact", type=int, default=0, metavar="K",
                        help="the campaign's runs keep exact copies of their newest K steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as tmp:
        os.environ.update({**moto_settings(endpoint, Path(tmp)), "EXCP_CACHE": str(Path(tmp) / "cache")})
        bucket = new_bucket(endpoint)
        with FaultProxy(endpoint, rate=args.rate, seed=args.seed, stall=1.5) as proxy:
            store = S3Store(bucket, "bench", endpoint_url=proxy.url, connect_timeout=1, read_timeout=1,
                            multipart_threshold=MIN_PART_SIZE, multipart_chunksize=MIN_PART_SIZE)
            campaign = Campaign(store, S3Store(bucket, "bench", endpoint_url=endpoint), proxy, args.seed,
                                args.keep_exact)
            for number in range(args.rounds):
                campaign.round(number)
                if number % 5 == 4 or number == args.rounds - 1:
                    campaign.check()
            plan = proxy.counts()
            campaign.final()
        service: Counter[str] = Counter()
        slowest: Counter[str] = Counter()
        with FaultProxy(endpoint) as proxy:
            root = Path(tmp) / "serve"
            root.mkdir()
            server = Server(root, proxied_backend(proxy, root, endpoint)).start()
            try:
                for cycle in range(args.outages):
                    outage_cycle(server, proxy, cycle, service, slowest)
            finally:
                server.stop()
            service["store_requests_failed_while_down"] = proxy.counts().get("down", 0)
    forwarded = plan.pop("forwarded")
    counts = campaign.counts
    print(json.dumps({
        "rounds": args.rounds, "rate": args.rate, "seed": args.seed,
        "requests_forwarded": forwarded, "faults_injected": plan, "faults_total": sum(plan.values()),
        "operations": {op: dict(c) for op, c in campaign.ops.items()},
        "commits": len(campaign.truth), "committed_despite_error": counts["committed_despite_error"],
        "steps_reverified": counts["steps_reverified"], "gc_deleted": counts["gc_deleted"],
        **({"exact": {key: counts[key] for key in ("exact_steps_checked", "exact_restores_through_faults",
                                                   "exact_archives_collected", "checks_over_keep",
                                                   "newest_without_copy")}}
           if args.keep_exact else {}),
        "service": {**{k: v for k, v in service.items() if k != "data_lost"},
                    **{k: round(v, 1) for k, v in slowest.items()}},
        "seconds": round(time.perf_counter() - start),
        "data_lost": counts["data_lost"] + service["data_lost"],
    }, indent=1))


if __name__ == "__main__":
    main()
