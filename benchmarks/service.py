"""Latency and throughput of the service (``excp serve``), end to end over HTTP.

Starts ``excp serve`` in a subprocess on 127.0.0.1 (a temporary directory store by
default) and, with the workload GPT (``Trainer('small')``, 3.2M parameters, AdamW;
a few training steps between checkpoints so they differ), measures:

a. pushing a chain of N checkpoints from a training node: the archive is coded here
   (``encode_archive`` against the head's reconstruction, kept between pushes) and
   sent with ``PUT .../archive``; per push the encode time, the upload+commit latency
   and the bytes sent against the size of the ``torch.save`` file;
b. raw uploads (``POST .../raw``) compressed by the server: once with the head decoded
   from the chain, once with the head the server kept from the previous raw upload;
c. a restore of the latest step over HTTP, cold (decoded by a worker) and cached,
   against a local ``excp.api.restore`` of the same step (the bytes must be equal);
d. 4 uploads to 4 different runs at once against the same 4 one after the other (wall
   time), for archive uploads and for raw uploads;
e. two writers racing for one step (the status codes).

    python benchmarks/service.py                       # temporary directory store
    python benchmarks/service.py --moto                # moto's S3 server, in this process
    EXCP_S3_ENDPOINT_URL=http://localhost:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python benchmarks/service.py --store s3://bucket/bench

Times are wall-clock seconds of single requests (the service's workers are started
before anything is timed); machine, load and store are printed with the tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; read when torch loads

import argparse
import copy
import dataclasses
import io
import itertools
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import requests
import torch

from excp import api, memory
from excp.chain import Commit, encode_archive
from excp.codec.params import PRESETS, CodecParams
from excp.workload import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serving import ServeProcess  # noqa: E402
from tests.s3_fixtures import moto_server, moto_settings, new_bucket  # noqa: E402

MB = 1e6


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@contextmanager
def moto_s3(env: dict[str, str], root: Path) -> Iterator[str]:
    """moto's S3 server in this process (tests/s3_fixtures.py), with a new bucket; yields
    the store URL and fills ``env`` with the settings that reach it."""
    with moto_server() as endpoint:
        env.update(moto_settings(endpoint, root))
        yield f"s3://{new_bucket(endpoint)}/bench"


class Service(ServeProcess):
    """``excp serve`` in a subprocess, and the requests a client makes."""

    def __init__(self, store: str, root: Path, env: dict[str, str], workers: int) -> None:
        super().__init__(root, store, workers=workers, env=env)

    def create(self, run: str, preset: str) -> None:
        response = requests.post(f"{self.base}/v1/runs", json={"name": run, "preset": preset}, timeout=60)
        response.raise_for_status()

    def info(self, run: str) -> dict:
        response = requests.get(f"{self.base}/v1/runs/{run}", timeout=60)
        response.raise_for_status()
        return response.json()

    def put_archive(self, run: str, step: int, body: bytes) -> requests.Response:
        return requests.put(f"{self.base}/v1/runs/{run}/checkpoints/{step}/archive", data=body, timeout=600)

    def post_raw(self, run: str, step: int, body: bytes) -> requests.Response:
        return requests.post(f"{self.base}/v1/runs/{run}/checkpoints/{step}/raw", data=body, timeout=600)

    def restore(self, run: str, step: int | str, fmt: str = "torch") -> requests.Response:
        response = requests.get(f"{self.base}/v1/runs/{run}/checkpoints/{step}", params={"format": fmt},
                                timeout=600)
        response.raise_for_status()
        return response


class Node:
    """A training node: codes each archive against the head the service reports, from
    the head's reconstruction it kept from its own previous push."""

    def __init__(self, service: Service, run: str) -> None:
        self.service, self.run = service, run
        self.recon: dict[str, torch.Tensor] | None = None

    def code(self, checkpoint: dict, step: int) -> tuple[bytes, dict, float]:
        info = self.service.info(self.run)
        head = info["head"] and Commit(**{f.name: info["head"][f.name] for f in dataclasses.fields(Commit)})
        out = io.BytesIO()
        (_, recon), seconds = _timed(lambda: encode_archive(
            self.run, CodecParams.from_dict(info["params"]), head, api.to_bundle(checkpoint), step, out,
            lambda _: self.recon))
        return out.getvalue(), recon, seconds


def _torch_bytes(checkpoint: dict) -> bytes:
    out = io.BytesIO()
    torch.save(checkpoint, out)
    return out.getvalue()


def _bitwise_equal(a: Any, b: Any) -> bool:
    """Same structure and values, tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_bitwise_equal(x, y) for x, y in zip(a, b, strict=True)))
    return type(a) is type(b) and a == b


def _checked(response: requests.Response, status: int) -> dict:
    if response.status_code != status:
        raise SystemExit(f"expected {status}, got {response.status_code}: {response.text[:500]}")
    return response.json()


def _parallel(jobs: list[Callable[[], requests.Response]], concurrent: bool) -> tuple[list[int], float]:
    """Run the jobs all at once (a barrier releases them together) or one by one; the
    status codes and the wall time."""
    if not concurrent:
        start = time.perf_counter()
        codes = [job().status_code for job in jobs]
        return codes, time.perf_counter() - start
    barrier = threading.Barrier(len(jobs) + 1)

    def run(job: Callable[[], requests.Response]) -> int:
        barrier.wait()
        return job().status_code

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        barrier.wait()
        start = time.perf_counter()
        codes = [f.result() for f in futures]
        return codes, time.perf_counter() - start


def measure(service: Service, store: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    trainer = Trainer("small", seed=args.seed, total_steps=1000)
    run, fig = "bench-gpt", {"section_s": {}}
    clock = [time.perf_counter()]

    def lap(section: str) -> None:
        now = time.perf_counter()
        fig["section_s"][section] = now - clock[0]
        print(f"{section}: {now - clock[0]:.1f} s", file=sys.stderr, flush=True)
        clock[0] = now

    service.create(run, args.preset)

    # (a) a chain pushed from a training node
    node, pushes = Node(service, run), []
    for _ in range(args.checkpoints):
        trainer.train_steps(args.train_steps)
        checkpoint = trainer.state_dict()
        body, recon, encode_s = node.code(checkpoint, trainer.step)
        response, upload_s = _timed(lambda b=body: service.put_archive(run, trainer.step, b))
        commit = _checked(response, 201)
        node.recon = recon
        pushes.append({"step": trainer.step, "keyframe": commit["keyframe"], "encode_s": encode_s,
                       "upload_commit_s": upload_s, "uploaded_bytes": len(body),
                       "torch_file_bytes": len(_torch_bytes(checkpoint)), "ratio": commit["ratio"]})
    fig["push"] = pushes
    fig["parameters"] = sum(p.numel() for p in trainer.model.parameters())

    lap("(a) chain")

    # (e) two writers racing for the next step: the same head, two different checkpoints
    trainer.train_steps(args.train_steps)
    mine = trainer.state_dict()
    theirs = copy.deepcopy(mine)
    first = next(iter(theirs["model"]))
    theirs["model"][first] = theirs["model"][first] + 1e-3
    bodies = [node.code(checkpoint, trainer.step)[0] for checkpoint in (mine, theirs)]
    codes, _ = _parallel([lambda b=b: service.put_archive(run, trainer.step, b) for b in bodies], True)
    fig["race"] = {"step": trainer.step, "status_codes": sorted(codes)}

    lap("(e) race")

    # start the workers (spawned on first use) before anything they do is timed
    _, fig["workers_start_s"] = _timed(lambda: _parallel(
        [lambda s=p["step"]: service.restore(run, s, "safetensors") for p in pushes[:args.workers]], True))

    lap("workers")

    # (b) raw uploads, compressed by the server
    raws = []
    for label in ("head decoded from the chain", "head kept from the previous raw upload"):
        trainer.train_steps(args.train_steps)
        body = _torch_bytes(trainer.state_dict())
        response, seconds = _timed(lambda b=body: service.post_raw(run, trainer.step, b))
        commit = _checked(response, 201)
        raws.append({"case": label, "step": trainer.step, "uploaded_bytes": len(body),
                     "latency_s": seconds, "stored_bytes": commit["size"], "ratio": commit["ratio"],
                     "keyframe": commit["keyframe"]})
    fig["raw"] = raws

    lap("(b) raw")

    # (c) the latest step: over HTTP cold and cached, and a local api.restore
    latest = trainer.step
    depth = service.info(run)["head"]["depth"]
    cold, cold_s = _timed(lambda: service.restore(run, "latest"))
    cached, cached_s = _timed(lambda: service.restore(run, "latest"))
    local = root / "local.pt"
    _, local_s = _timed(lambda: api.restore(run, latest, local, store=store))
    served = torch.load(io.BytesIO(cold.content), weights_only=True)
    fig["restore"] = {"step": latest, "archives_decoded": depth + 1, "bytes": len(cold.content),
                      "http_cold_s": cold_s, "http_cached_s": cached_s, "local_api_s": local_s,
                      "same_bytes": cold.content == cached.content == local.read_bytes(),
                      "same_tensors": _bitwise_equal(served, torch.load(local, weights_only=True))}

    lap("(c) restore")

    # (d) 4 uploads to 4 runs, one after the other and all at once (new runs each round)
    checkpoint = trainer.state_dict()
    raw_body = _torch_bytes(checkpoint)
    params = PRESETS[args.preset]
    parallel: dict[str, dict[str, Any]] = {"archive": {}, "raw": {"body_bytes": len(raw_body)}}
    for kind, rnd, mode in itertools.product(("archive", "raw"), range(args.rounds),
                                             ("sequential", "concurrent")):
        jobs = []
        for i in range(args.concurrent):
            name = f"bench-{kind}-{rnd}-{mode}-{i}"
            service.create(name, args.preset)
            if kind == "archive":  # an archive names its run, so each is coded for its own
                out = io.BytesIO()
                encode_archive(name, params, None, api.to_bundle(checkpoint), trainer.step, out,
                               lambda _: None)
                body = out.getvalue()
                parallel["archive"]["body_bytes"] = len(body)
                jobs.append(lambda n=name, b=body: service.put_archive(n, trainer.step, b))
            else:
                jobs.append(lambda n=name: service.post_raw(n, trainer.step, raw_body))
        codes, wall = _parallel(jobs, mode == "concurrent")
        if codes != [201] * len(jobs):
            raise SystemExit(f"{kind} uploads ({mode}) answered {codes}")
        parallel[kind].setdefault(f"{mode}_rounds_s", []).append(wall)
    for figures in parallel.values():
        for mode in ("sequential", "concurrent"):
            figures[f"{mode}_s"] = statistics.median(figures[f"{mode}_rounds_s"])
    fig["parallel"] = parallel
    lap("(d) parallel")
    return fig


def report(fig: dict[str, Any], meta: dict[str, Any]) -> str:
    threads = meta["server_threads"]
    serve = f"`excp serve --workers {meta['workers']}`" + ("" if threads is None else
                                                          f" with OMP_NUM_THREADS={threads}")
    lines = [f"Store: {meta['store_kind']} (`{meta['store']}`); machine: {meta['machine']}; "
             f"load average at start {meta['load_start']}; torch {meta['torch']} "
             f"({meta['threads']} threads); workload GPT `small` ({fig['parameters'] / 1e6:.1f}M parameters "
             f"+ AdamW moments), preset `{meta['preset']}`, {meta['train_steps']} training steps between "
             f"checkpoints; {serve} started its workers (first restores) "
             f"in {fig['workers_start_s']:.1f} s; allocator {meta['allocator']} in the client.",
             "", "(a) pushing a chain from a training node (encode here, `PUT .../archive`)", "",
             "| step | kind | encode (s) | upload + commit (s) | sent (MB) | torch.save file (MB) "
             "| ratio (fp32 / stored) |",
             "|---|---|---|---|---|---|---|"]
    for p in fig["push"]:
        lines.append(f"| {p['step']} | {'keyframe' if p['keyframe'] else 'link'} | {p['encode_s']:.2f} | "
                     f"{p['upload_commit_s']:.3f} | {p['uploaded_bytes'] / MB:.2f} | "
                     f"{p['torch_file_bytes'] / MB:.1f} | {p['ratio']:.1f}x |")
    links = [p for p in fig["push"] if not p["keyframe"]]
    if links:
        mean = {k: sum(p[k] for p in links) / len(links)
                for k in ("encode_s", "upload_commit_s", "uploaded_bytes", "torch_file_bytes")}
        lines.append(f"| links, mean | | {mean['encode_s']:.2f} | {mean['upload_commit_s']:.3f} | "
                     f"{mean['uploaded_bytes'] / MB:.2f} | {mean['torch_file_bytes'] / MB:.1f} | "
                     f"{mean['torch_file_bytes'] / mean['uploaded_bytes']:.0f}x fewer bytes sent |")
    lines += ["", "(b) raw uploads compressed by the server (`POST .../raw`)", "",
              "| case | step | sent (MB) | latency (s) | stored (MB) | ratio |", "|---|---|---|---|---|---|"]
    for r in fig["raw"]:
        lines.append(f"| {r['case']} | {r['step']} | {r['uploaded_bytes'] / MB:.1f} | {r['latency_s']:.2f} | "
                     f"{r['stored_bytes'] / MB:.2f} | {r['ratio']:.1f}x |")
    r = fig["restore"]
    lines += ["", f"(c) restoring the latest step ({r['step']}: {r['archives_decoded']} archives from its "
              f"keyframe, a {r['bytes'] / MB:.1f} MB torch file)", "",
              "| restore | seconds |", "|---|---|",
              f"| `GET .../checkpoints/latest`, cold (a worker decodes) | {r['http_cold_s']:.2f} |",
              f"| `GET .../checkpoints/latest`, cached | {r['http_cached_s']:.2f} |",
              f"| local `excp.api.restore` of the same step | {r['local_api_s']:.2f} |",
              f"| the same checkpoint (cold, cached and local) | {_same(r)} |"]
    count = meta["concurrent"]
    lines += ["", f"(d) {count} uploads to {count} different runs (new runs: each a keyframe; median of "
              f"{meta['rounds']} rounds)", "",
              "| upload | body (MB) | one after the other (s) | all at once (s) | speed-up |",
              "|---|---|---|---|---|"]
    for kind, label in (("archive", "`PUT .../archive` (coded here)"), ("raw", "`POST .../raw`")):
        p = fig["parallel"][kind]
        lines.append(f"| {label} | {p['body_bytes'] / MB:.1f} | {p['sequential_s']:.2f} | "
                     f"{p['concurrent_s']:.2f} | {p['sequential_s'] / p['concurrent_s']:.2f}x |")
    race = fig["race"]
    lines += ["", f"(e) two writers racing for step {race['step']} with different checkpoints: status codes "
              f"{race['status_codes']}"]
    return "\n".join(lines)


def _same(restore: dict[str, Any]) -> str:
    if restore["same_bytes"]:
        return "yes, byte for byte"
    return "yes, tensors bit for bit (files differ)" if restore["same_tensors"] else "**NO**"


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--store", help="store URL for the service (default: a temporary directory); an "
                       "s3:// URL reads the usual AWS / EXCP_S3_* settings")
    where.add_argument("--moto", action="store_true", help="run moto's S3 server in this process and use "
                       "a new bucket on it")
    parser.add_argument("--checkpoints", type=int, default=6, help="checkpoints in the pushed chain")
    parser.add_argument("--train-steps", type=int, default=5, help="training steps between checkpoints")
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--workers", type=int, default=2, help="excp serve --workers")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the service and its workers (default: torch's own choice)")
    parser.add_argument("--concurrent", type=int, default=4, help="uploads at once in (d)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (d); the median is shown")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is here (the CLI and server tune it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if min(args.checkpoints, args.concurrent, args.workers, args.rounds) < 1:
        parser.error("--checkpoints, --concurrent, --workers and --rounds are at least 1")
    if not args.default_allocator:
        memory.tune_allocator()

    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="excp-bench-service-") as tmp:
        root = Path(tmp)
        os.environ["EXCP_CACHE"] = str(root / "client-cache")
        env = {k: v for k, v in os.environ.items() if k not in ("EXCP_TOKENS", "EXCP_STORE")
               and not (args.moto and k.startswith(("AWS_", "EXCP_S3_")))}
        with moto_s3(env, root) if args.moto else nullcontext() as moto_url:
            store = moto_url or args.store or str(root / "store")
            os.environ.update(env)  # this process restores from the same store in (c)
            if args.server_threads is not None:
                env["OMP_NUM_THREADS"] = str(args.server_threads)
            service = Service(store, root, env, args.workers)
            try:
                fig = measure(service, store, args, root)
            finally:
                service.stop()
    kind = "moto S3 (in this process)" if args.moto else ("S3" if store.startswith("s3://") else
                                                           "directory" if "://" not in store else store)
    meta = {"store": store if not store.startswith(tempfile.gettempdir()) else "a temporary directory",
            "store_kind": kind, "machine": _machine(), "load_start": load_start, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "preset": args.preset, "train_steps": args.train_steps,
            "workers": args.workers, "server_threads": args.server_threads, "concurrent": args.concurrent,
            "rounds": args.rounds,
            "allocator": "default" if args.default_allocator else "tuned (excp.memory)",
            "checkpoints": args.checkpoints,
            "total_s": time.perf_counter() - started}
    print(report(fig, meta))
    print(f"\n(benchmark wall time {meta['total_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "figures": fig}, indent=1))


if __name__ == "__main__":
    main()
