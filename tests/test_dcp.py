"""excp as a torch.distributed.checkpoint backend: FSDP2 on CPU with gloo, 4 and 2
ranks spawned by the tests, compared with an uncompressed DCP save of the same steps."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict

from excp import api
from excp.codec import adam
from excp.codec.params import PRESETS
from excp.dcp import ExcpStorageReader, ExcpStorageWriter, load_state_dict
from excp.errors import InvalidInput
from excp.sharded.exact import ShardedCopies
from excp.sharded.records import ShardedRun
from excp.store import LocalStore
from tests import dcp_workers

STEPS = [3, 6, 9]
# half the default preset's coarsest weight level spacing: the codec's error bound
WEIGHT_ERROR = 0.5 * PRESETS["default"].lr_step * dcp_workers.LR * 2**adam.COARSER * (1 + 1e-5)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn: Callable, world: int, *args: object, deadline: float = 240) -> list[int | None]:
    """Run ``fn(rank, world, port, *args)`` on ``world`` processes; their exit codes
    (None for one still running at the deadline, which is then killed)."""
    context = mp.start_processes(fn, args=(world, _port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    end = time.monotonic() + deadline
    for process in context.processes:
        process.join(max(0.0, end - time.monotonic()))
    codes = [p.exitcode for p in context.processes]
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    return codes


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 3, 6, 9 of a 4-rank FSDP2 run, saved by excp (the last with async_save) and
    by plain DCP."""
    root = tmp_path_factory.mktemp("dcp")
    codes = _spawn(dcp_workers.save_chain, 4, str(root / "store"), str(root / "plain"), STEPS, str(root),
                   True)
    assert codes == [0, 0, 0, 0]
    return root


def _copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved / "store", tmp_path / "store")
    return tmp_path


def _plain(path: Path, tmp_path: Path) -> dict:
    """An uncompressed DCP save as one state dict, by torch's own converter."""
    dcp_to_torch_save(path, tmp_path / "plain.pt")
    return torch.load(tmp_path / "plain.pt", weights_only=True)


def _tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    if isinstance(tree, list | tuple):
        return {k: v for i, value in enumerate(tree) for k, v in _tensors(value, f"{prefix}/{i}").items()}
    return {}


def test_a_chain_saved_on_4_ranks(saved: Path) -> None:
    run = ShardedRun(LocalStore(saved / "store"), "fsdp")
    commits = run.commits()
    assert [c.step for c in commits] == STEPS and all(c.world_size == 4 for c in commits)
    assert all(r.keyframe for r in commits[0].ranks.values())
    for previous, commit in zip(commits, commits[1:], strict=False):
        assert sorted(commit.ranks) == [0, 1, 2, 3]
        assert all(r.parent == previous.step and not r.keyframe for r in commit.ranks.values())
    plain = sum(f.stat().st_size for f in (saved / "plain" / "9").iterdir())
    assert commits[-1].size * 5 < plain  # links are several times smaller than DCP's own files


def test_one_process_restores_a_sharded_step(saved: Path, tmp_path: Path) -> None:
    store = LocalStore(saved / "store")
    got = load_state_dict(store, "fsdp", 9)
    want = _plain(saved / "plain" / "9", tmp_path)
    got_t, want_t = _tensors(got), _tensors(want)
    assert got_t.keys() == want_t.keys()
    for name, tensor in want_t.items():
        assert got_t[name].shape == tensor.shape and got_t[name].dtype == tensor.dtype, name
        if "/model/" in name:
            assert float((got_t[name] - tensor).abs().max()) <= WEIGHT_ERROR, name
        if name.endswith("/step"):
            assert torch.equal(got_t[name], tensor), name
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]

    out = tmp_path / "step-9.pt"
    done = subprocess.run([sys.executable, "-c", "from excp.cli import main; main()", "restore",
                           "--run", "fsdp", "--step", "9", "-o", str(out), "--store", str(saved / "store")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = torch.load(out, weights_only=True)
    for name, tensor in _tensors(written).items():
        assert torch.equal(tensor, got_t[name]), name


@pytest.mark.slow
def test_load_on_2_ranks_and_go_on_with_a_keyframe(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path)
    codes = _spawn(dcp_workers.load_and_continue, 2, str(root / "store"), str(saved / "plain"), 9, 12,
                   str(root))
    assert codes == [0, 0]
    seen = json.loads((root / "load-2.json").read_text())
    assert max(seen["errors"].values()) <= WEIGHT_ERROR and seen["loss"] == seen["loss"]
    commit = ShardedRun(LocalStore(root / "store"), "fsdp").commit(12)
    assert commit.world_size == 2 and all(r.keyframe for r in commit.ranks.values())
    logs = "".join(p.read_text() for p in root.glob("log-2-*.txt"))
    assert "keyframe, because the sharding changed since step 9" in logs


@pytest.mark.slow
def test_load_on_the_same_4_ranks_and_go_on_with_links(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path)
    codes = _spawn(dcp_workers.load_and_continue, 4, str(root / "store"), str(saved / "plain"), 9, 12,
                   str(root))
    assert codes == [0, 0, 0, 0]
    assert max(json.loads((root / "load-4.json").read_text())["errors"].values()) <= WEIGHT_ERROR
    commit = ShardedRun(LocalStore(root / "store"), "fsdp").commit(12)
    assert all(r.parent == 9 and not r.keyframe for r in commit.ranks.values())


@pytest.mark.slow
def test_a_rank_dying_mid_save_leaves_no_commit(tmp_path: Path) -> None:
    codes = _spawn(dcp_workers.save_and_die, 2, str(tmp_path / "store"), [2, 4], deadline=150)
    assert codes[1] == 17 and codes[0] != 0
    run = ShardedRun(LocalStore(tmp_path / "store"), "dying")
    assert [c.step for c in run.commits()] == [2]
    state = load_state_dict(run.store, "dying", "latest")
    assert state["optim"]["state"]  # the previous step restores whole


@pytest.mark.slow
def test_exact_copies_on_2_ranks(tmp_path: Path) -> None:
    """keep_exact=1: the newest step loads bit for bit on the ranks and in one process,
    older ones give their reconstruction, and only the newest copy is kept."""
    store, plain = tmp_path / "store", tmp_path / "plain"
    codes = _spawn(dcp_workers.save_exact, 2, str(store), str(plain), [2, 4, 6], str(tmp_path))
    assert codes == [0, 0]
    assert json.loads((tmp_path / "exact.json").read_text()) == {"2": False, "4": False, "6": True}
    run = ShardedRun(LocalStore(store), "exact")
    assert [r.step for r in ShardedCopies(run).records()] == [6]
    assert api.exact_steps("exact", str(store)) == [6]
    assert sorted(ShardedCopies(run).records()[0].ranks) == [0, 1]
    assert len(list((store / "runs/exact/dcp/exact/ranks").rglob("*.excp"))) == 2
    want = {step: _tensors(_plain(plain / str(step), tmp_path)) for step in (4, 6)}
    for step, exact in ((6, True), (4, False)):
        got = _tensors(api.load_dict(api.restore("exact", step, store=str(store))))
        assert got.keys() == want[step].keys()
        assert all(got[n].dtype == t.dtype for n, t in want[step].items())
        assert all(torch.equal(got[n], t) for n, t in want[step].items()) == exact, step
    lossy = _tensors(api.load_dict(api.restore("exact", 6, store=str(store), lossy=True)))
    assert not all(torch.equal(lossy[n], t) for n, t in want[6].items())
    model = {n: t for n, t in want[6].items() if "/model/" in n}
    assert all(float((lossy[n] - t).abs().max()) <= WEIGHT_ERROR for n, t in model.items())


# --- one process, no process group: pairing, options, bad input ----------------------------


def _plain_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_moments_pair_with_their_weights_by_name(tmp_path: Path) -> None:
    model, optimizer = _plain_model()
    model_state, optim_state = get_state_dict(model, optimizer)
    model.register_buffer("scale", torch.ones(3))  # not in get_state_dict's copy: added below
    state = {"model": {**model_state, "scale": torch.ones(3)}, "optim": optim_state}
    dcp.save(state, storage_writer=ExcpStorageWriter(str(tmp_path / "s"), "pairs", 1))
    info = api.inspect_archive(tmp_path / "s" / ShardedRun(LocalStore(tmp_path / "s"), "pairs")
                               .commit(1).ranks[0].archive)
    roles = {t["name"]: (t["role"], t.get("param")) for unit in info["units"] for t in unit["tensors"]}
    assert roles["model.0.weight|0,0"] == ("weight", None)
    assert roles["model.0.weight|0,0@exp_avg_sq"] == ("exp_avg_sq", "model.0.weight|0,0")
    assert roles["model.scale|0"][0] == "other"  # no optimizer state: a buffer, stored bit-exact
    assert roles["optim.state.0.weight.step|"][0] == "other"

    restored = api.load_dict(api.restore("pairs", 1, store=str(tmp_path / "s")))
    assert torch.equal(restored["model"]["scale"], torch.ones(3))
    assert restored["optim"]["param_groups"] == optim_state["param_groups"]
    loaded = {"model": {**model_state}, "optim": optim_state}
    dcp.load(loaded, storage_reader=ExcpStorageReader(str(tmp_path / "s"), "pairs", "latest"))


def test_bad_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer = _plain_model()
    model_state, optim_state = get_state_dict(model, optimizer)
    store = str(tmp_path / "s")
    # DCP reports what a storage writer raised during a save inside a CheckpointException
    with pytest.raises(CheckpointException, match="InvalidInput: optimizer state .* fits several tensors"):
        dcp.save({"model": model_state, "ema": {k: v.clone() for k, v in model_state.items()},
                  "optim": optim_state}, storage_writer=ExcpStorageWriter(store, "ambiguous", 1))
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=ExcpStorageWriter(store, "r", 1))
    with pytest.raises(CheckpointException, match="Conflict: run 'r' already has step 1"):
        dcp.save({"model": model_state}, storage_writer=ExcpStorageWriter(store, "r", 1))
    with pytest.raises(InvalidInput, match="not through an excp service"):
        ExcpStorageWriter("excp://127.0.0.1:9", "r", 2)
    with pytest.raises(InvalidInput, match="drop checkpoint_id"):
        dcp.save({"model": model_state}, checkpoint_id=str(tmp_path / "x"),
                 storage_writer=ExcpStorageWriter(store, "r", 2))
    api.push({"model": model_state}, "plain-run", step=1, store=store)
    with pytest.raises(CheckpointException, match="holds ordinary checkpoints"):
        dcp.save({"model": model_state}, storage_writer=ExcpStorageWriter(store, "plain-run", 2))
    with caplog.at_level(logging.INFO, logger="excp.dcp"):
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=ExcpStorageWriter(store, "r", 2))
    assert "run r step 2 committed" in caplog.text
    assert api.restore("r", 2, store=store).step == 2
    assert ShardedRun(LocalStore(tmp_path / "s"), "r").commit(2).ranks[0].parent == 1


def _trained(model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """One more training step; the state dict to save, and a copy of its tensors by path
    (training changes the model's own in place)."""
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    return {k: v.clone() for k, v in _tensors(state).items()}, state


def _bitwise(got: dict, want: dict[str, torch.Tensor]) -> bool:
    tensors = _tensors(got)
    assert tensors.keys() == want.keys() and all(tensors[n].dtype == t.dtype for n, t in want.items())
    return all(torch.equal(tensors[n], t) for n, t in want.items())


def test_an_exact_record_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that dies after its step's commit but before its exact record leaves the
    step restorable from its links; gc collects the copies no record names."""
    store = str(tmp_path / "s")
    model, optimizer = _plain_model()
    first, state = _trained(model, optimizer)
    with monkeypatch.context() as patched:
        patched.setattr(ShardedCopies, "put", lambda self, record: (_ for _ in ()).throw(OSError("lost")))
        with pytest.raises(CheckpointException, match="lost"):
            dcp.save(state, storage_writer=ExcpStorageWriter(store, "crash", 1, keep_exact=1))
    run = ShardedRun(LocalStore(tmp_path / "s"), "crash")
    assert run.steps() == [1] and api.exact_steps("crash", store) == []
    orphans = [str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("dcp/exact/ranks/*/*.excp")]
    assert len(orphans) == 1
    assert not _bitwise(api.load_dict(api.restore("crash", 1, store=store)), first)
    assert api.gc("crash", store=store).keys == []  # the latest step's copy may still be on its way

    second, state = _trained(model, optimizer)
    dcp.save(state, storage_writer=ExcpStorageWriter(store, "crash", 2))
    assert api.exact_steps("crash", store) == [2]
    assert api.gc("crash", store=store).keys == orphans
    assert _bitwise(api.load_dict(api.restore("crash", 2, store=store)), second)
    assert api.verify("crash", store=store).checkpoints == 2

    (tmp_path / "s" / "runs/crash/dcp/commits/000000000002.json").unlink()  # a step gone: its copy with it
    record = ShardedCopies(run).records()[0]
    assert sorted(api.gc("crash", store=store).keys) == sorted(
        ["runs/crash/dcp/exact/commits/000000000002.json", record.ranks[0].archive])


def test_exact_copies_in_one_process(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    model, optimizer = _plain_model()
    for step in (1, 2):
        original, state = _trained(model, optimizer)
        dcp.save(state, storage_writer=ExcpStorageWriter(store, "one", step, keep_exact=1))
    loaded = {"model": state["model"], "optim": state["optim"]}
    for tensor in _tensors(loaded).values():
        tensor.zero_()
    dcp.load(loaded, storage_reader=ExcpStorageReader(store, "one", 2))
    assert _bitwise(loaded, original)
    dcp.load(loaded, storage_reader=ExcpStorageReader(store, "one", 2, lossy=True))
    assert not _bitwise(loaded, original)

    lossy = api.restore("one", 2, store=store, lossy=True)
    assert _bitwise(load_state_dict(LocalStore(tmp_path / "s"), "one", 2, lossy=True),
                    _tensors(api.load_dict(lossy)))
    for record in (tmp_path / "s").rglob("dcp/exact/commits/*.json"):
        record.unlink()  # without its record the step has no exact copy: its links alone
    assert api.exact_steps("one", store) == []
    assert _bitwise(api.load_dict(api.restore("one", 2, store=store)), _tensors(api.load_dict(lossy)))

    with pytest.raises(CheckpointException, match=r"InvalidInput: run 'one' was created keeping exact copies "
                       r"of the newest 1 steps, not 2"):
        dcp.save(state, storage_writer=ExcpStorageWriter(store, "one", 3, keep_exact=2))
    with pytest.raises(InvalidInput, match="keep_exact=-1"):
        ExcpStorageWriter(store, "one", 3, keep_exact=-1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from excp.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_ls_verify_and_rebuild_a_sharded_run(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path)
    store = str(root / "store")
    listed = _cli("ls", "--run", "fsdp", "--store", store)
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert listed.returncode == 0 and [(r[0], r[1], r[2]) for r in rows] == \
        [("3", "keyframe", "-"), ("6", "link", "3"), ("9", "link", "6")]
    verified = _cli("verify", "--run", "fsdp", "--store", store)
    assert verified.returncode == 0 and "ok: 3 checkpoints" in verified.stdout, verified.stderr
    rebuilt = _cli("rebuild", "--run", "fsdp", "-o", str(root / "all"), "--store", store)
    assert rebuilt.returncode == 0 and "wrote 3 checkpoints" in rebuilt.stdout, rebuilt.stderr
    six = torch.load(root / "all" / f"step-{6:012d}.pt", weights_only=True)
    for name, tensor in _tensors(load_state_dict(LocalStore(root / "store"), "fsdp", 6)).items():
        assert torch.equal(_tensors(six)[name], tensor), name

    archive = root / "store" / ShardedRun(LocalStore(root / "store"), "fsdp").commit(6).ranks[2].archive
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x10
    archive.write_bytes(bytes(data))
    broken = _cli("verify", "--run", "fsdp", "--store", store)
    assert broken.returncode == 5 and "[corrupt_data]" in broken.stderr and "Traceback" not in broken.stderr


@pytest.mark.slow
def test_the_torchrun_example_saves_and_resumes(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "dcp_fsdp.py"
    runs = [subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(_port()), str(example), str(tmp_path / "store")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step 0; steps [20, 40, 60]" in runs[0].stdout
    assert "resumed from step 60; steps [20, 40, 60, 80, 100, 120]" in runs[1].stdout
    commit = ShardedRun(LocalStore(tmp_path / "store"), "fsdp-example").commit(80)
    assert all(r.parent == 60 for r in commit.ranks.values())  # resumed on 2 ranks: links go on


_THREADS_AFTER_DESTROY = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from excp.dcp.shutdown import release_meshes

def threads(): return len(os.listdir("/proc/self/task"))

def train():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    fully_shard(model)
    model(torch.randn(2, 8)).sum().backward()

dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
train()
dist.destroy_process_group()
before = threads()
release_meshes()
print(before, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
def test_a_destroyed_fsdp_process_group_is_freed_at_exit() -> None:
    """After training returns and destroy_process_group, an FSDP2 job's gloo workers still
    run (DTensor's cache holds the group); the exit hook frees the group, so its workers
    are joined before Python finalizes (a worker freeing a collective's tensors after
    that point aborts the job)."""
    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_DESTROY, str(_port())], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert after < before, (before, after)
