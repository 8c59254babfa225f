"""`excp gc`: what no commit record names goes, committed data never does, and a push
in progress (even one racing the collector) never loses its archive."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from excp import api
from excp.chain import Chain, encode_archive
from excp.client import Checkpointer
from excp.dcp import ExcpStorageWriter, load_state_dict
from excp.errors import Conflict
from excp.sharded.records import ShardedRun
from excp.store import LocalStore
from tests.conftest import TinyRun


def _restored(run: str, store: str) -> dict[int, dict]:
    return {c.step: api.load_dict(api.restore(run, c.step, store=store))["model"]
            for c in api.list_commits(run, store)}


def _dead_push(chain: Chain, checkpoint: dict, step: int) -> str:
    """What a push that died between its two writes leaves: an archive, no commit."""
    out = io.BytesIO()
    summary, _ = encode_archive(chain.run, chain.params(), chain.head(), api.to_bundle(checkpoint), step,
                                out, lambda head: chain.restore(head.step)[1])
    key = f"runs/{chain.run}/archives/{step:012d}-{summary.digest}.excp"
    chain.store.put(key, out.getvalue())
    return key


def test_gc_deletes_only_what_no_commit_needs(tmp_path: Path) -> None:
    store, tiny = str(tmp_path / "s"), TinyRun()
    api.push(tiny.advance(5), "r", store=store)
    chain = Chain(LocalStore(tmp_path / "s"), "r")
    dead = _dead_push(chain, tiny.advance(5), 10)
    api.push(tiny.advance(5), "r", step=15, store=store)  # the job went on after the crash
    in_progress = _dead_push(chain, tiny.advance(5), 20)  # a push that has not committed yet
    before = _restored("r", store)

    planned = api.gc("r", store=store, dry_run=True)
    assert planned.keys == [dead] and planned.bytes == chain.store.size(dead)
    assert chain.store.exists(dead)
    done = api.gc(store=store)
    assert done.keys == [dead] and not chain.store.exists(dead) and chain.store.exists(in_progress)
    after = _restored("r", store)
    assert before.keys() == after.keys() == {5, 15}
    for step, model in before.items():
        assert all(torch.equal(after[step][k], v) for k, v in model.items())
    assert api.verify("r", store=store).checkpoints == 2
    assert api.gc(store=store).keys == []


def test_gc_beside_an_active_writer(tmp_path: Path) -> None:
    store, tiny = str(tmp_path / "s"), TinyRun()
    stop, deleted, rounds = threading.Event(), [], [0]

    def collect() -> None:
        while not stop.is_set():
            deleted.extend(api.gc(store=store).keys)
            rounds[0] += 1

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        with Checkpointer("busy", store, every=1) as ckpt:
            for _ in range(30):
                tiny.advance(1)
                ckpt.step(tiny.step, tiny.model, tiny.opt)
    finally:
        stop.set()
        collector.join()
    assert rounds[0] > 5 and deleted == []
    assert len(api.list_commits("busy", store)) == 30
    assert api.verify("busy", store=store).checkpoints == 30


def test_a_push_racing_the_collector_never_commits_a_missing_archive(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store, tiny = LocalStore(tmp_path / "s"), TinyRun()
    api.push(tiny.advance(5), "r", store=store)
    real = store.put_if_absent

    def collected_meanwhile(key: str, data: bytes) -> bool:
        if "/commits/" in key:  # another writer moved the head and gc took this archive
            for archive in store.list("runs/r/archives/"):
                if "000000000010-" in archive:
                    store.delete(archive)
        return real(key, data)

    monkeypatch.setattr(store, "put_if_absent", collected_meanwhile)
    with pytest.raises(Conflict, match="collected as garbage while this push committed"):
        api.push(tiny.advance(5), "r", store=store)
    monkeypatch.undo()
    assert [c.step for c in api.list_commits("r", store)] == [5]
    assert api.verify("r", store=store).checkpoints == 1


def test_gc_of_a_sharded_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    store = str(tmp_path / "s")
    for step in (1, 2, 3):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=ExcpStorageWriter(store, "s", step))
    sharded = ShardedRun(LocalStore(tmp_path / "s"), "s")
    orphan = sharded.archive_key(2, 1, "0" * 32)  # a second rank that died in step 2's save
    sharded.store.put(orphan, b"partial")
    before = load_state_dict(sharded.store, "s", 3)
    assert api.gc("s", store=store).keys == [orphan]
    after = load_state_dict(sharded.store, "s", 3)
    assert torch.equal(after["model"]["weight"], before["model"]["weight"])
    assert api.verify("s", store=store).checkpoints == 3


def test_gc_from_the_command_line(tmp_path: Path) -> None:
    store, tiny = str(tmp_path / "s"), TinyRun()
    api.push(tiny.advance(5), "r", store=store)
    dead = _dead_push(Chain(LocalStore(tmp_path / "s"), "r"), tiny.advance(5), 10)
    api.push(tiny.advance(5), "r", step=15, store=store)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from excp.cli import main; main()", "gc", *args,
                               "--store", store], capture_output=True, text=True, timeout=120)

    dry = cli("--dry-run")
    assert dry.returncode == 0 and dead in dry.stdout and "would delete 1 unreferenced objects" in dry.stdout
    done = cli()
    assert done.returncode == 0 and "deleted 1 unreferenced objects" in done.stdout
    missing = cli("--run", "nope")
    assert missing.returncode == 3 and "[not_found]" in missing.stderr
