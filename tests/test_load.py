"""Load on a real ``excp serve`` (``benchmarks/load.py`` at a small size): training
processes pushing while readers restore, and the server's memory under concurrent
large uploads.

Nothing here asserts a time. The memory bound is a resource assertion: uploads are
streamed to disk and checked a chunk at a time, so four concurrent 64 MiB bodies must
not raise the server's resident memory by as much as one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import Job, check_data, check_uploads, run_load, upload_all, write_archives
from excp.client import Client
from tests.serve_fixtures import TEAM_A, Server, new_backend

pytestmark = pytest.mark.slow

MB = 1 << 20
UPLOADS, UPLOAD_SIZE = 4, 64 * MB
MEMORY_BOUND = UPLOAD_SIZE  # one body held whole anywhere breaks it
ONE_TENSOR = 19 << 20  # float32 elements: each archive is one tensor (~68 MB coded)


def _url(server: Server) -> str:
    return f"excp://127.0.0.1:{server.port}"


def test_pushers_and_readers_at_once(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """3 training processes × 4 checkpoints through the service while 2 readers restore
    random committed steps: every push commits, every restore equals the store's
    restore of its step, no request fails, every run verifies."""
    server = Server(tmp_path, new_backend("local", tmp_path, request)).start()
    runs = [f"team-a-load-{i}" for i in range(3)]
    job = Job(_url(server), TEAM_A, params=3e5, every=3, checkpoints=4, decode_here=0.5, timeout=120.0)
    try:
        with Client(job.url, TEAM_A) as client:
            for run in runs:
                client.create_run(run)
        result = run_load(job, runs, readers=2, server_pid=server.proc.pid)
        checks = check_data(server.store, job, result, sample=1, root=tmp_path)
    finally:
        server.stop()
    assert result.errors == []
    assert result.committed == {run: [3, 6, 9, 12] for run in runs}
    assert sum(len(r["samples"]) for r in result.pushers) == 12  # every upload call was timed
    assert len(result.restored) >= 2  # each reader restored at least once
    assert checks["checkpoints_stored"] == checks["checkpoints_verified"] == 12
    assert checks["unverified_runs"] == {} and checks["missing_commits"] == []
    assert checks["restores_compared"] == len(result.restored) + 2 * len(runs)
    assert checks["mismatched_steps"] == [] and checks["data_lost"] == 0
    assert result.rss["peak_total_MB"] > 0


def test_server_memory_is_bounded_under_concurrent_uploads(tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    """4 uploads of 64 MiB archives at once: all commit and verify, and the server's
    peak resident memory (main process + workers) rises by less than one body. Each
    archive is a single tensor, the worst case for checking an upload: before the
    check decoded a chunk at a time it kept whole streams (a quarter of the tensor
    each), and this rose by ~100 MB (~24 MB after)."""
    server = Server(tmp_path, new_backend("local", tmp_path, request), max_body=2 * UPLOAD_SIZE).start()
    runs = [f"team-a-big-{i}" for i in range(UPLOADS)]
    try:
        paths = write_archives(tmp_path / "archives", runs, UPLOAD_SIZE, elements=ONE_TENSOR)
        archives = list(zip(runs, paths, strict=True))
        with Client(_url(server), TEAM_A) as client:
            for run in runs:
                client.create_run(run, "lossless")
        result = upload_all(_url(server), TEAM_A, archives, server.proc.pid, timeout=300.0)
    finally:
        server.stop()
    sent = sum(path.stat().st_size for path in paths)
    assert sent > 0.9 * UPLOADS * UPLOAD_SIZE
    assert result.created == [True] * UPLOADS
    assert check_uploads(server.store, archives, result) == {
        "committed": UPLOADS, "verified": UPLOADS, "data_lost": 0, "lost_runs": []}
    assert result.peak["samples"] > 1
    assert result.increase_total < MEMORY_BOUND, (result.idle, result.peak)
