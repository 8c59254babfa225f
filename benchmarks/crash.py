"""Crash consistency: SIGKILL a pusher, or the server it pushes to, at a random point
of a push, many times, and check after each kill that nothing was lost or
half-committed (what the CI tests do once per kind, here a hundred times at random
points).

``--target store``: each round starts a pusher on one directory store — alternately
``excp push`` (the CLI) and a training loop with the ``Checkpointer`` hook — and kills
it after a random delay.

``--target service``: each round starts ``excp serve`` on a directory store (or, with
``--s3``, on a bucket of moto's S3 server over HTTP) and a pusher through it — in turn
``excp push --server`` (coded here, uploaded as an archive), the hook on
``excp://HOST:PORT``, and raw ``torch.save`` uploads the server's workers compress —
then SIGKILLs the *server* (and its workers) after a random delay, then the pusher.

``--keep-exact K``: every run keeps exact copies of its newest K steps (every pusher
passes K: ``excp push --keep-exact``, the hook's ``keep_exact``, the service's
``create_run``), so a kill may also land between a link's commit and its exact copy's
archive, record, or the drop of the oldest copy.

After every round: ``excp verify`` passes, every committed step restores bit-equal to
what was restored of it after the round it was committed in (nothing committed ever
changes), no commit names a missing archive, and ``excp gc`` removes only unreferenced
archives and leaves a chain that still verifies. With ``--keep-exact``, before and
after gc: no exact record names a missing archive, every step ``exact_steps`` lists
restores to the content digest of the file ``excp push`` was given (CLI steps) or, for
the hook's and raw uploads' steps, to its record's and to what it restored to the
first time, and at most K exact steps exist (K + 1 after a push killed between its
record and the drop of the oldest copy, counted). Prints the counts as JSON.

    python benchmarks/crash.py --rounds 100
    python benchmarks/crash.py --target service --rounds 100
    python benchmarks/crash.py --rounds 15 --keep-exact 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from excp import api
from excp.chain import Chain
from excp.client import Client
from excp.errors import NotFound
from excp.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.copies import check_copies, pushed_digest  # noqa: E402
from benchmarks.serving import ROOT, ServeProcess  # noqa: E402
from tests.s3_fixtures import moto_server, moto_settings, new_bucket  # noqa: E402

HOOK_JOB = """
import sys, time, torch
sys.path.insert(0, {root!r})
from tests.conftest import TinyRun
from excp.client import Checkpointer
tiny = TinyRun(seed={seed}, width={width})
ckpt = Checkpointer("hook", {store!r}, every=10, keep_exact={keep})
start = ckpt.restore(tiny.model, tiny.opt)
tiny.step = start["step"] if start else 0
for _ in range(1000):
    time.sleep(0.02)  # the rest of a training step
    tiny.advance(1)
    ckpt.step(tiny.step, tiny.model, tiny.opt)
ckpt.close()
"""
RAW_JOB = """
import sys, tempfile, torch
sys.path.insert(0, {root!r})
from tests.conftest import TinyRun
from excp.client import Client
client = Client({url!r}, retries=0)
client.create_run("raw", keep_exact={keep})
done = client.checkpoints("raw")
step = done[-1].step if done else 0
tiny = TinyRun(seed={seed}, width={width})
with tempfile.TemporaryDirectory() as tmp:
    for _ in range(50):
        step += 10
        torch.save(tiny.advance(10), f"{{tmp}}/ckpt.pt")
        client.upload_raw("raw", step, f"{{tmp}}/ckpt.pt")
"""
SERVICE_RUNS = ("cli", "hook", "raw")
STORE_WIDTH = 128
SERVICE_WIDTH = 16384
"""Through the service, 1M-parameter checkpoints (12 MB with the moments), so that a
kill more often lands inside an upload or a server-side compression."""


def _cli_job(where: list[str], work: Path, step: int, seed: int, width: int, keep: int,
             pushed: dict[tuple[str, int], str]) -> list[str]:
    """``excp push`` of a new checkpoint at ``step``; ``where`` is ``--store URL`` or
    ``--server URL``. Records the checkpoint's content digest in ``pushed``: what an
    exact copy of the step must restore to."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import TinyRun

    path = work / f"ckpt-{step}.pt"
    checkpoint = TinyRun(seed=seed, width=width).advance(3 + step % 7)
    checkpoint["step"] = step
    torch.save(checkpoint, path)
    pushed["cli", step] = pushed_digest(path)
    return [sys.executable, "-c", "from excp.cli import main; main()", "push", str(path), "--run", "cli",
            *where, *(["--keep-exact", str(keep)] if keep else [])]


def _check(store: str, run: str, seen: dict[tuple[str, int], str]) -> int:
    """Verify the run and compare every step (all decoded in one pass over the chain)
    with what it restored to the first time; returns the steps checked."""
    try:
        chain = Chain(open_store(store), run)
        chain.config()
    except NotFound:
        return 0
    api.verify(run, store=store)
    checked = 0
    for commit, bundle in chain.replay():
        digest = bundle.digest()
        if seen.setdefault((run, commit.step), digest) != digest:
            raise SystemExit(f"{run} step {commit.step} restores differently after a crash")
        checked += 1
    return checked


class Copies:
    """What the exact-copy checks carry from round to round: the runs' K, the content
    digests of checkpoints pushed by the CLI, what each exact step restored to first,
    and the steps left without their copy (a kill between the link's commit and its
    exact record)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.pushed: dict[tuple[str, int], str] = {}
        self.seen: dict[tuple[str, int], str] = {}
        self.uncopied: set[tuple[str, int]] = set()

    def counts(self) -> dict[str, int]:
        return {"exact_steps_checked": 0, "exact_archives_collected": 0, "rounds_over_keep": 0} \
            if self.keep else {}

    def check(self, store: str, runs: tuple[str, ...], counts: dict[str, int], after_gc: bool) -> None:
        """The exact-copy invariants of every run (see ``benchmarks/copies.py``); stops
        the campaign at the first violation."""
        if not self.keep:
            return
        st = open_store(store)
        for run in runs:
            problems, excess = check_copies(st, run, self.keep, self.pushed, self.seen)
            if problems:
                raise SystemExit("\n".join(problems))
            if after_gc or not Chain(st, run).exists():
                continue
            counts["rounds_over_keep"] += excess
            steps = api.exact_steps(run, store=st)
            counts["exact_steps_checked"] += len(steps)
            commits = api.list_commits(run, store=st)
            if commits and commits[-1].step not in steps:
                self.uncopied.add((run, commits[-1].step))


def _kill(job: subprocess.Popen) -> bool:
    """SIGKILL ``job``; False if it had already exited."""
    alive = job.poll() is None
    if alive:
        job.kill()
    job.wait()
    return alive


def _after_round(store: str, runs: tuple[str, ...], seen: dict[tuple[str, int], str],
                 counts: dict[str, int], copies: Copies) -> None:
    counts["rounds"] += 1
    for run in runs:
        _check(store, run, seen)
    copies.check(store, runs, counts, after_gc=False)
    keys = api.gc(store=store).keys
    counts["gc_deleted"] += len(keys)
    if copies.keep:
        counts["exact_archives_collected"] += sum("/exact/archives/" in key for key in keys)
    for run in runs:
        _check(store, run, seen)
    copies.check(store, runs, counts, after_gc=True)


def kill_pushers(rounds: int, rng: random.Random, work: Path, env: dict[str, str],
                 seen: dict[tuple[str, int], str], store: str, copies: Copies) -> dict[str, int]:
    counts = {"rounds": 0, "killed": 0, "finished_before_kill": 0, "gc_deleted": 0, **copies.counts()}
    for round_ in range(rounds):
        if round_ % 2 == 0:
            command = _cli_job(["--store", store], work, 10 * (round_ + 1), round_, STORE_WIDTH, copies.keep,
                               copies.pushed)
        else:
            command = [sys.executable, "-c",
                       HOOK_JOB.format(root=str(ROOT), seed=round_, store=store, width=STORE_WIDTH,
                                       keep=copies.keep)]
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # python + torch start in about a second, then the CLI pushes once (1.7 s in
        # all, idle) and the hook pushes every 10 steps until it is killed
        time.sleep(rng.uniform(1.0, 3.5) if round_ % 2 == 0 else rng.uniform(1.5, 5.0))
        counts["killed" if _kill(job) else "finished_before_kill"] += 1
        _after_round(store, ("cli", "hook"), seen, counts, copies)
    return counts


def _pushes_in_flight(url: str) -> int:
    """Uploads the server is in the middle of, read from its metrics just before a kill."""
    families = text_string_to_metric_families(Client(url, retries=0).metrics())
    return int(sum(sample.value for family in families for sample in family.samples
                   if sample.name == "excp_http_requests_in_flight" and sample.labels["method"] != "GET"))


def kill_servers(rounds: int, rng: random.Random, work: Path, env: dict[str, str],
                 seen: dict[tuple[str, int], str], store: str, copies: Copies) -> dict[str, int]:
    counts = {"rounds": 0, "servers_killed": 0, "killed_mid_push": 0, "pushers_cut_off": 0,
              "pushers_finished": 0, "gc_deleted": 0, **copies.counts()}
    for round_ in range(rounds):
        server = ServeProcess(work, store, env=env, own_group=True)
        url = server.base
        kind = SERVICE_RUNS[round_ % len(SERVICE_RUNS)]
        if kind == "cli":
            command = _cli_job(["--server", url], work, 10 * (round_ + 1), round_, SERVICE_WIDTH, copies.keep,
                               copies.pushed)
        else:
            job = HOOK_JOB if kind == "hook" else RAW_JOB
            command = [sys.executable, "-c",
                       job.format(root=str(ROOT), seed=round_, store=url, url=url, width=SERVICE_WIDTH,
                                  keep=copies.keep)]
        pusher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the pusher starts in about 1.5 s, then pushes until it fails or ends; every
        # other kill waits for an upload in flight (a push is a small part of the time)
        time.sleep(rng.uniform(1.0, 6.0))
        deadline = time.monotonic() + (10.0 if round_ % 2 else 0.0)
        while not (in_flight := _pushes_in_flight(url)) and time.monotonic() < deadline:
            time.sleep(0.005)
        counts["killed_mid_push"] += in_flight > 0
        counts["servers_killed"] += server.kill()
        time.sleep(rng.uniform(0.0, 1.0))  # the pusher meets the dead server, or not yet
        _kill(pusher)
        counts["pushers_finished" if pusher.returncode == 0 else "pushers_cut_off"] += 1
        _after_round(store, SERVICE_RUNS, seen, counts, copies)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("store", "service"), default="store",
                        help="kill pushers writing to a store, or the server they push to")
    parser.add_argument("--s3", action="store_true", help="with --target service: the server's store is "
                        "a bucket on moto's S3 server instead of a directory")
    parser.add_argument("--keep-exact", type=int, default=0, metavar="K",
                        help="runs keep exact copies of their newest K steps, checked after every round")
    args = parser.parse_args()
    if args.s3 and args.target != "service":
        parser.error("--s3 goes with --target service")
    rng = random.Random(args.seed)
    seen: dict[tuple[str, int], str] = {}
    copies = Copies(args.keep_exact)
    with tempfile.TemporaryDirectory() as tmp, moto_server() if args.s3 else nullcontext() as endpoint:
        work = Path(tmp)
        store = str(work / "store")
        if endpoint is not None:  # this process and its children reach moto by excp's own variables
            os.environ.update(moto_settings(endpoint, work))
            store = f"s3://{new_bucket(endpoint)}/ckpts"
        env = {**os.environ, "EXCP_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        if args.target == "store":
            counts = kill_pushers(args.rounds, rng, work, env, seen, store, copies)
        else:
            counts = kill_servers(args.rounds, rng, work, env, seen, store, copies)
        counts["steps_committed"] = len(seen)
        if copies.keep:
            counts["steps_left_without_copy"] = len(copies.uncopied)
        counts["seconds"] = round(time.perf_counter() - start)
    counts["data_lost"] = 0  # _check stops the campaign at the first change; verify raises on a failure
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
