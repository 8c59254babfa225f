"""Load on one excp service: training processes push while readers restore, and large
uploads at once against the server's memory.

Starts ``excp serve`` on 127.0.0.1 (a temporary directory store) in a subprocess and
samples its resident memory — the server process plus its worker processes, with
psutil, every 50 ms — while one of two loads runs:

a. (default) ``--pushers`` training processes (an MLP of ``--params`` weights + AdamW)
   each save ``--checkpoints`` checkpoints, one every ``--every`` steps, to a run of
   their own with ``excp.client.Checkpointer`` through the service, while ``--readers``
   processes restore random committed steps of random runs until the pushers are done:
   the service's restore (``GET .../checkpoints/{step}``, decoded by a server worker)
   or, for a ``--decode-here`` share of them, the client's (archives downloaded and
   decoded in the reader). Every upload call and every restore call is timed. Then
   every run is verified in the store, every restore a reader made is compared byte
   for byte with the same step restored straight from the store, and ``--sample``
   steps per run are restored through the service once more (both ways) and compared.
b. (``--big-uploads N``) N uploads at once of ``--big-size`` archives (lossless
   keyframes of random float32 tensors, one run each; written to disk beforehand by a
   subprocess and streamed from the file, so the client stays small too), against the
   server's idle memory; then every upload is checked as committed and verified.

    python benchmarks/load.py                                     # (a), 2-3 min on 2 cores
    python benchmarks/load.py --big-uploads 10 --big-size 500MB   # (b), 5 GB of archives

Prints one JSON object. The clients do not retry (``--retries``), so every failed
request is counted in ``errors``; ``errors`` and ``data_lost`` must be 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; read when torch loads

import argparse
import hashlib
import json
import multiprocessing
import platform
import random
import resource
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psutil
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from excp import api
from excp.adapters import save_checkpoint
from excp.chain import Chain, Commit, PushResult, archive_digest, encode_archive
from excp.client import Checkpointer, Client, ServiceTarget
from excp.client.http import Download
from excp.codec.params import PRESETS
from excp.errors import ExcpError
from excp.store import Store, open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serving import ServeProcess  # noqa: E402

MB = 1e6
SAMPLE_S = 0.05
BIG_STEP = 1
WIDTH = 512
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# --- the server and its memory ------------------------------------------------------


def _tokens(token: str | None) -> dict | None:
    """A tokens file of one admin token, or none (an open local server)."""
    if token is None:
        return None
    return {"tokens": [{"name": "load", "token": token, "scopes": ["admin"], "prefixes": [""]}]}


def process_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` alone and with all its descendants: the server's tensor
    work runs in worker processes, so its footprint is the sum."""
    proc = psutil.Process(pid)
    main = proc.memory_info().rss
    total = main
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:  # a worker replaced between the listing and the read
            pass
    return main, total


class RssSampler:
    """The peak of :func:`process_rss`, sampled on a thread every ``interval`` seconds
    while the ``with`` block runs (a peak between two samples can be missed)."""

    def __init__(self, pid: int, interval: float = SAMPLE_S) -> None:
        self.pid, self.interval = pid, interval
        self.peak_main = self.peak_total = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            main, total = process_rss(self.pid)
            self.peak_main, self.peak_total = max(self.peak_main, main), max(self.peak_total, total)
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict[str, float]:
        return {"peak_main_MB": round(self.peak_main / MB, 1),
                "peak_total_MB": round(self.peak_total / MB, 1), "samples": self.samples}


def idle_rss(pid: int, seconds: float = 1.0) -> RssSampler:
    """The server's memory at rest: the peak over ``seconds`` with no request running."""
    with RssSampler(pid) as idle:
        time.sleep(seconds)
    return idle


def start_workers(job: Job, count: int, root: Path) -> None:
    """Have the server spawn its ``count`` worker processes (it does on first use) before
    anything is measured: ``count`` restores at once of a one-step run ``warm-up``."""
    with job.client() as client:
        model, optimizer, _ = build_model(WIDTH * WIDTH, job.seed)
        ServiceTarget(client).push({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                                   "warm-up", step=1)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda i: client.restore("warm-up", 1, root / f"warm-up-{i}.pt"), range(count)))


def restore_cache_counts(url: str) -> dict[str, int]:
    """Server restores by cache outcome (``hit``/``miss``), from ``/metrics``."""
    text = requests.get(f"http://{url.split('://', 1)[1]}/metrics", timeout=30).text
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "excp_restore_seconds_count":
                outcome = sample.labels.get("cache", "?")
                counts[outcome] = counts.get(outcome, 0) + int(sample.value)
    return counts


# --- (a) pushers and readers ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every pusher and reader process is given."""

    url: str
    token: str | None = None
    params: float = 2e6
    every: int = 20
    checkpoints: int = 20
    decode_here: float = 0.25
    threads: int = 1
    retries: int = 0
    timeout: float = 600.0
    seed: int = 0

    def client(self) -> TimedClient:
        return TimedClient(self.url, self.token, retries=self.retries, timeout=self.timeout)


class TimedClient(Client):
    """A client that records each upload, restore and archive download it makes:
    ``[kind, wall-clock start, seconds, bytes]`` (wall clock, to line up processes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples: list[list[Any]] = []

    def record(self, kind: str, start: float, seconds: float, size: int) -> None:
        self.samples.append([kind, start, seconds, size])

    def upload_archive(self, run: str, step: int, archive: str | Path | BinaryIO) -> PushResult:
        start, began = time.time(), time.perf_counter()
        result = super().upload_archive(run, step, archive)
        self.record("push", start, time.perf_counter() - began, result.commit.size)
        return result

    def restore(self, run: str, step: int | str, out: str | Path, fmt: str = "torch") -> Download:
        start, began = time.time(), time.perf_counter()
        download = super().restore(run, step, out, fmt)
        self.record("restore", start, time.perf_counter() - began, download.size)
        return download

    def download_archive(self, run: str, commit: Commit, out: BinaryIO) -> None:
        start, began = time.time(), time.perf_counter()
        super().download_archive(run, commit, out)
        self.record("download", start, time.perf_counter() - began, commit.size)


def build_model(params: float, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """An MLP of about ``params`` weights (layers of ``WIDTH``), AdamW, and a batch."""
    torch.manual_seed(seed)
    layers = max(1, round(params / (WIDTH * WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())
                                  for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(64, WIDTH)


def push_job(job: Job, run: str, seed: int) -> dict[str, Any]:
    """A training process: trains, and saves every ``job.every`` steps through the
    service with the training-loop hook; returns its samples, commits and errors."""
    torch.set_num_threads(job.threads)
    model, optimizer, batch = build_model(job.params, seed)
    client = job.client()
    errors: list[str] = []
    started = time.time()
    ckpt = Checkpointer(run, ServiceTarget(client), every=job.every)
    for step in range(1, job.every * job.checkpoints + 1):
        optimizer.zero_grad()
        (model(batch) - batch).square().mean().backward()
        optimizer.step()
        try:
            ckpt.step(step, model, optimizer)
        except ExcpError as exc:
            errors.append(str(exc))
    try:
        ckpt.close()
    except ExcpError as exc:
        errors.append(str(exc))
    stats = ckpt.stats
    return {"role": "pusher", "run": run, "started": started, "ended": time.time(), "samples": client.samples,
            "errors": errors, "committed": [c.step for c in stats.commits], "saves": stats.saves,
            "stall_s": stats.snapshot_s, "waited_s": stats.waited_s, "push_s": stats.push_s,
            "stored_bytes": stats.stored_bytes, "raw_bytes": stats.raw_bytes}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def restore_once(client: TimedClient, run: str, step: int, here: bool, out: Path) -> str:
    """Restore ``step`` into ``out`` through the service — decoded by the server, or
    (``here``) from downloaded archives decoded in this process — and return the
    file's sha256 (the service writes the same bytes as a local ``excp restore``)."""
    out.unlink(missing_ok=True)
    if here:
        start, began = time.time(), time.perf_counter()
        ServiceTarget(client).restore(run, step, out)
        client.record("restore-here", start, time.perf_counter() - began, out.stat().st_size)
    else:
        client.restore(run, step, out)
    return _sha256(out)


def read_job(job: Job, runs: list[str], stop: str, seed: int) -> dict[str, Any]:
    """A reader: restores random committed steps of random runs until the file ``stop``
    exists — and at least once, so a short run still compares something, unless
    nothing was committed at all."""
    torch.set_num_threads(job.threads)
    rng, client, errors = random.Random(seed), job.client(), []
    restored: list[list[Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="excp-load-reader-") as tmp:
        while not (Path(stop).exists() and (restored or errors)):
            run = rng.choice(runs)
            try:
                steps = [c.step for c in client.checkpoints(run)]
                if steps:
                    step, here = rng.choice(steps), rng.random() < job.decode_here
                    digest = restore_once(client, run, step, here, Path(tmp) / "out.pt")
                    restored.append([run, step, here, digest])
                elif Path(stop).exists():
                    break  # its pusher is done and committed nothing
                else:
                    time.sleep(0.05)
            except ExcpError as exc:
                errors.append(f"{run}: {exc}")
    return {"role": "reader", "started": started, "ended": time.time(), "samples": client.samples,
            "errors": errors, "restored": restored}


@dataclass
class LoadResult:
    """What the processes reported, and the server's memory meanwhile."""

    pushers: list[dict[str, Any]]
    readers: list[dict[str, Any]]
    rss: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [e for report in self.pushers + self.readers for e in report["errors"]]

    @property
    def committed(self) -> dict[str, list[int]]:
        return {report["run"]: report["committed"] for report in self.pushers}

    @property
    def restored(self) -> list[list[Any]]:
        return [r for report in self.readers for r in report["restored"]]


def run_load(job: Job, runs: list[str], readers: int, server_pid: int) -> LoadResult:
    """One pusher process per run and ``readers`` reader processes (spawned: torch and
    the HTTP client are not fork-safe), the readers stopped once every pusher is done;
    the server's memory is sampled throughout."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="excp-load-") as tmp, \
            ProcessPoolExecutor(len(runs) + readers, mp_context=context) as pool, \
            RssSampler(server_pid) as rss:
        stop = Path(tmp) / "stop"
        pushing = [pool.submit(push_job, job, run, job.seed + i) for i, run in enumerate(runs)]
        reading = [pool.submit(read_job, job, runs, str(stop), job.seed + 1000 + i) for i in range(readers)]
        wait(pushing)
        stop.touch()
        result = LoadResult([f.result() for f in pushing], [f.result() for f in reading])
    result.rss = rss.figures()
    return result


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (``q`` in 0..1)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _window(reports: list[dict[str, Any]]) -> float:
    return max(r["ended"] for r in reports) - min(r["started"] for r in reports)


def request_figures(result: LoadResult) -> dict[str, Any]:
    """Per kind of request: count, rate, megabytes and latency percentiles; rates are
    over the pushers' span for pushes and the readers' span for reads. Megabytes are
    what crossed the wire, except for ``restore-here``: the checkpoint it wrote (its
    archives crossed the wire as the ``download`` rows)."""
    spans = {"push": _window(result.pushers)}
    spans["restore"] = spans["restore-here"] = spans["download"] = _window(result.readers)
    samples = [s for report in result.pushers + result.readers for s in report["samples"]]
    figures: dict[str, Any] = {}
    for kind, span in spans.items():
        latencies = [s[2] for s in samples if s[0] == kind]
        size = sum(s[3] for s in samples if s[0] == kind)
        if latencies:
            figures[kind] = {"count": len(latencies), "per_s": round(len(latencies) / span, 2),
                             "MB": round(size / MB, 1), "MB_per_s": round(size / MB / span, 2),
                             "p50_s": round(_percentile(latencies, 0.5), 3),
                             "p99_s": round(_percentile(latencies, 0.99), 3),
                             "max_s": round(max(latencies), 3)}
    return figures


def throughput(by_kind: dict[str, Any]) -> dict[str, float]:
    """The totals: pushes and restores (both kinds) a second, megabytes a second up
    (archives pushed) and down (server restores and archive downloads)."""
    def rate(*kinds: str, key: str = "per_s") -> float:
        return round(sum(by_kind[k][key] for k in kinds if k in by_kind), 2)

    return {"pushes_per_s": rate("push"), "restores_per_s": rate("restore", "restore-here"),
            "MB_per_s_up": rate("push", key="MB_per_s"),
            "MB_per_s_down": rate("restore", "download", key="MB_per_s")}


def store_digests(store: Store, run: str, root: Path) -> dict[int, str]:
    """sha256 of every committed step of ``run`` restored straight from the store (each
    link decoded once, in chain order) and written as ``excp restore`` writes it."""
    digests = {}
    for commit, bundle in Chain(store, run).replay():
        out = root / f"{run}-{commit.step}.pt"
        save_checkpoint(bundle, out)
        digests[commit.step] = _sha256(out)
        out.unlink()
    return digests


def check_data(store: Store, job: Job, result: LoadResult, sample: int, root: Path) -> dict[str, Any]:
    """After the load: every step a pusher saw committed is in the store, every run
    verifies, every reader's restore equals the store's restore of that step, and
    ``sample`` steps per run restore equal through the service (both ways) again."""
    stored = {run: [c.step for c in api.list_commits(run, store)] for run in result.committed}
    missing = sorted((run, step) for run, steps in result.committed.items()
                     for step in set(steps) - set(stored[run]))
    verified, unverified = 0, {}
    for run in stored:
        try:
            verified += api.verify(run, store=store).checkpoints
        except ExcpError as exc:
            unverified[run] = str(exc)
    digests = {run: store_digests(store, run, root) for run in stored}
    compared = [(run, step, digest) for run, step, _, digest in result.restored]
    rng, client = random.Random(job.seed), job.client()
    with client:
        for run, steps in stored.items():
            for step in rng.sample(steps, min(sample, len(steps))):
                for here in (False, True):
                    compared.append((run, step, restore_once(client, run, step, here, root / "sample.pt")))
    mismatched = sorted({(run, step) for run, step, digest in compared if digests[run].get(step) != digest})
    lost = len(missing) + len(mismatched) + sum(len(stored[run]) for run in unverified)
    return {"runs": len(stored), "checkpoints_stored": sum(map(len, stored.values())),
            "checkpoints_verified": verified, "unverified_runs": unverified,
            "missing_commits": missing, "restores_compared": len(compared),
            "mismatched_steps": mismatched, "data_lost": lost}


def hook_figures(pushers: list[dict[str, Any]]) -> dict[str, Any]:
    """What the training-loop hook cost the pushers, summed over them."""
    total = {key: sum(r[key] for r in pushers) for key in ("saves", "stall_s", "waited_s", "push_s",
                                                             "raw_bytes", "stored_bytes")}
    saves = max(1, total["saves"])
    return {"saves": total["saves"], "stall_ms_per_save": round(1000 * total["stall_s"] / saves, 2),
            "waited_s": round(total["waited_s"], 1), "push_s_per_save": round(total["push_s"] / saves, 2),
            "ratio": round(total["raw_bytes"] / max(1, total["stored_bytes"]), 1)}


def load_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """(a): the server, its workers started, then the load, then the checks."""
    token = secrets.token_urlsafe(24) if args.tokens else None
    server = ServeProcess(root, str(root / "store"), workers=args.workers, tokens=_tokens(token))
    job = Job(server.url, token, args.params, args.every, args.checkpoints, args.decode_here,
              args.threads, args.retries, seed=args.seed)
    runs = [f"load-{i}" for i in range(args.pushers)]
    try:
        with Client(server.url, token) as client:
            for run in runs:
                client.create_run(run)
        start_workers(job, args.workers, root)
        idle = idle_rss(server.proc.pid)
        started = time.perf_counter()
        result = run_load(job, runs, args.readers, server.proc.pid)
        load_s = time.perf_counter() - started
        cache = restore_cache_counts(server.url)
        checks = check_data(open_store(str(root / "store")), job, result, args.sample, root)
    finally:
        server.stop()
    by_kind = request_figures(result)
    return {"load_s": round(load_s, 1), "throughput": throughput(by_kind), "requests": by_kind,
            "errors": len(result.errors), "error_messages": result.errors[:5],
            "server_rss": {"idle_main_MB": round(idle.peak_main / MB, 1),
                           "idle_total_MB": round(idle.peak_total / MB, 1), **result.rss},
            "server_restores_by_cache": cache,
            "hook": hook_figures(result.pushers), "checks": checks}


# --- (b) large uploads at once --------------------------------------------------------


def write_archives(root: Path, runs: list[str], size: float, elements: int = 4 << 20,
                   seed: int = 0) -> list[Path]:
    """A lossless keyframe (step ``BIG_STEP``) of about ``size`` bytes per run, of random
    float32 tensors of ``elements`` each: the same tensors for every run, coded once per
    run (an archive names its run). Random mantissas keep lossless coding near 1.17x."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    probe = _encode(runs[0], {"w0": torch.randn(elements, generator=generator)}, root / "probe.excp")
    count = max(1, round(size / probe.stat().st_size))
    probe.unlink()
    state = {f"w{i}": torch.randn(elements, generator=generator) for i in range(count)}
    return [_encode(run, state, root / f"{run}.excp") for run in runs]


def _encode(run: str, state: dict[str, torch.Tensor], path: Path) -> Path:
    with open(path, "wb") as out:
        encode_archive(run, PRESETS["lossless"], None, api.to_bundle(state), BIG_STEP, out, lambda _: None)
    return path


@dataclass
class UploadResult:
    """N uploads at once: each one's answer, the wall time, the server's memory, and
    this process's peak resident memory before and after them."""

    created: list[bool]
    latencies: list[float]
    commits: list[Commit]
    wall_s: float
    idle: dict[str, float]
    peak: dict[str, float]
    client_peak_MB: tuple[float, float]

    @property
    def increase_total(self) -> float:
        return (self.peak["peak_total_MB"] - self.idle["peak_total_MB"]) * MB


def upload_all(url: str, token: str | None, archives: list[tuple[str, Path]], server_pid: int,
               timeout: float = 1800.0) -> UploadResult:
    """Upload every ``(run, archive)`` at once, each on its own thread and connection
    (released together by a barrier), with the server's memory sampled at rest before
    and throughout. The client streams each file a megabyte at a time."""
    idle = idle_rss(server_pid)
    client_before = _peak_rss_self()
    barrier = threading.Barrier(len(archives) + 1)

    def upload(run: str, path: Path) -> tuple[PushResult, float]:
        with Client(url, token, retries=0, timeout=timeout) as client:
            barrier.wait()
            began = time.perf_counter()
            return client.upload_archive(run, BIG_STEP, path), time.perf_counter() - began

    with ThreadPoolExecutor(len(archives)) as pool, RssSampler(server_pid) as peak:
        futures = [pool.submit(upload, run, path) for run, path in archives]
        barrier.wait()
        began = time.perf_counter()
        answers = [f.result() for f in futures]
        wall = time.perf_counter() - began
    return UploadResult([a.created for a, _ in answers], [s for _, s in answers],
                        [a.commit for a, _ in answers], wall, idle.figures(), peak.figures(),
                        (client_before, _peak_rss_self()))


def _peak_rss_self() -> float:
    """This process's peak resident memory so far (MB; Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1)


def check_uploads(store: Store, archives: list[tuple[str, Path]], result: UploadResult) -> dict[str, Any]:
    """Each run holds exactly its upload: one commit whose digest and size are the
    file's, and the run verifies."""
    lost = []
    for (run, path), commit in zip(archives, result.commits, strict=True):
        with open(path, "rb") as handle:
            same = commit.digest == archive_digest(handle) and commit.size == path.stat().st_size
        try:
            ok = same and api.verify(run, store=store).checkpoints == 1
        except ExcpError:
            ok = False
        if not ok:
            lost.append(run)
    return {"committed": sum(result.created), "verified": len(archives) - len(lost), "data_lost": len(lost),
            "lost_runs": lost}


def big_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """(b): the archives written first (in a subprocess), then the server, the
    uploads and the checks."""
    runs = [f"big-{i}" for i in range(args.big_uploads)]
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # keeps us small
        paths = pool.submit(write_archives, root / "archives", runs, args.big_size, args.big_tensor,
                            args.seed).result()
    generate_s = time.perf_counter() - started
    archives = list(zip(runs, paths, strict=True))
    token = secrets.token_urlsafe(24) if args.tokens else None
    server = ServeProcess(root, str(root / "store"), workers=args.workers, tokens=_tokens(token))
    try:
        with Client(server.url, token) as client:
            for run in runs:
                client.create_run(run, "lossless")
        result = upload_all(server.url, token, archives, server.proc.pid)
        checks = check_uploads(open_store(str(root / "store")), archives, result)
    finally:
        server.stop()
    total = sum(p.stat().st_size for p in paths)
    return {"uploads": len(paths), "archive_MB": round(total / len(paths) / MB, 1),
            "total_MB": round(total / MB),
            "tensor_MB": round(4 * args.big_tensor / MB, 1), "generate_s": round(generate_s, 1),
            "wall_s": round(result.wall_s, 1), "MB_per_s": round(total / MB / result.wall_s, 1),
            "latency_s": {"p50": round(_percentile(result.latencies, 0.5), 1),
                          "max": round(max(result.latencies), 1)},
            "server_rss": {"idle_main_MB": result.idle["peak_main_MB"],
                           "idle_total_MB": result.idle["peak_total_MB"], **result.peak,
                           "increase_total_MB": round(result.increase_total / MB, 1)},
            "client_peak_rss_MB": {"before_uploads": result.client_peak_MB[0],
                                   "after_uploads": result.client_peak_MB[1]},
            "checks": checks}


# --- main -----------------------------------------------------------------------------


def byte_size(text: str) -> float:
    """``500MB``, ``1GiB`` or a number of bytes (the client does not import the server)."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper() or "B"
    if unit not in UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 500MB, 1GiB or bytes")
    return float(number) * UNITS[unit]


def _machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return {"cores": os.cpu_count(), "cpu": model, "memory_GB": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "torch": torch.__version__}


@contextmanager
def _workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="excp-bench-load-") as tmp:
        root = Path(tmp)
        os.environ["EXCP_CACHE"] = str(root / "client-cache")  # inherited by the spawned processes
        yield root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pushers", type=int, default=4, help="training processes, one run each")
    parser.add_argument("--readers", type=int, default=4, help="restoring processes")
    parser.add_argument("--params", type=float, default=2e6, help="weights of each pusher's model")
    parser.add_argument("--every", type=int, default=20, help="training steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints per pusher")
    parser.add_argument("--decode-here", type=float, default=0.25,
                        help="share of reads decoded in the reader from downloaded archives")
    parser.add_argument("--sample", type=int, default=3, help="steps per run restored again after the load")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pusher and reader")
    parser.add_argument("--workers", type=int, default=2, help="excp serve --workers")
    parser.add_argument("--retries", type=int, default=0, help="client retries (0: every failure counts)")
    parser.add_argument("--tokens", action="store_true", help="serve with a tokens file and send a token")
    parser.add_argument("--big-uploads", type=int, default=0,
                        help="run (b) instead: this many uploads at once")
    parser.add_argument("--big-size", type=byte_size, default="500MB", help="size of each archive in (b)")
    parser.add_argument("--big-tensor", type=int, default=4 << 20, help="float32 elements per tensor in (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.pushers, args.readers, args.every, args.checkpoints, args.workers) < 1:
        parser.error("--pushers, --readers, --every, --checkpoints and --workers are at least 1")
    machine = _machine()
    started = time.perf_counter()
    with _workspace() as root:
        figures = big_benchmark(args, root) if args.big_uploads else load_benchmark(args, root)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    report = {"machine": machine, "config": config, **figures,
              "total_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
