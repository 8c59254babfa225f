"""Exact copies beside the lossy chain (``keep_exact``): the newest K steps restore bit
for bit, older ones from their links, the chain itself is unchanged, a crash leaves
nothing half-visible, and every bad option is one clear error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from excp import api
from excp.bundle import Bundle
from excp.cli import main
from excp.client import Checkpointer, open_target
from excp.codec import correction
from excp.codec.params import PRESETS
from excp.errors import InvalidInput
from excp.exact import ExactCopies
from excp.format.container import ArchiveReader
from excp.store import LocalStore
from tests.conftest import TinyRun


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical training, and a model this small trains faster so
    yield
    torch.set_num_threads(threads)


def _checkpoints(n: int, every: int = 5) -> list[dict]:
    tiny = TinyRun()
    return [copy.deepcopy(tiny.advance(every)) for _ in range(n)]


def _same_bits(got: Bundle, want: Bundle) -> bool:
    """Every tensor equal with the same dtype, every extra the same bytes."""
    return got.tensors.keys() == want.tensors.keys() and got.extras == want.extras and all(
        got.tensors[name].tensor.dtype == entry.tensor.dtype
        and torch.equal(got.tensors[name].tensor, entry.tensor) for name, entry in want.tensors.items())


@pytest.mark.parametrize("keep", [1, 2])
def test_the_newest_k_steps_restore_bit_for_bit_and_the_chain_is_unchanged(tmp_path: Path, keep: int) -> None:
    store, plain = str(tmp_path / "s"), str(tmp_path / "plain")
    checkpoints = _checkpoints(4)
    for ckpt in checkpoints:
        api.push(ckpt, "r", store=store, keep_exact=keep)
        api.push(ckpt, "r", store=plain)
    steps = [c.step for c in api.list_commits("r", store)]
    assert steps == [5, 10, 15, 20]
    assert api.exact_steps("r", store) == steps[-keep:]
    assert [r.step for r in ExactCopies(LocalStore(tmp_path / "s"), "r").records()] == steps[-keep:]
    assert len(list((tmp_path / "s" / "runs" / "r" / "exact" / "archives").iterdir())) == keep
    # The link gives back integer state, scalars and extras bit for bit: a copy corrects
    # only weights and moments.
    record = ExactCopies(LocalStore(tmp_path / "s"), "r").records()[-1]
    with open(tmp_path / "s" / record.archive, "rb") as handle:
        reader = ArchiveReader(handle, record.size)
        assert {t["role"] for u in reader.units for t in u.tensors} == {"weight", "exp_avg", "exp_avg_sq"}
        assert reader.extras == {} and reader.header["kind"] == "exact"

    for step, ckpt in zip(steps, checkpoints, strict=True):
        restored = api.restore("r", step, store=store)
        assert _same_bits(restored, api.to_bundle(ckpt)) == (step in steps[-keep:]), step
        # The lossy reconstruction is the one a run without exact copies gives.
        lossy = api.restore("r", step, store=store, lossy=True)
        assert _same_bits(lossy, api.restore("r", step, store=plain))
        assert not _same_bits(lossy, api.to_bundle(ckpt))
    # The links themselves are the same archives.
    digests = [c.digest for c in api.list_commits("r", store)]
    assert digests == [c.digest for c in api.list_commits("r", plain)]
    assert api.exact_steps("r", plain) == []
    assert api.verify("r", store=store).checkpoints == 4


def test_restore_writes_the_exact_file(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    last = _checkpoints(2)[-1]
    for ckpt in _checkpoints(2):
        api.push(ckpt, "r", store=store, keep_exact=1)
    api.restore("r", "latest", tmp_path / "out.pt", store=store)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["meta"] == last["meta"] and loaded["step"] == last["step"]
    for name, tensor in last["model"].items():
        assert torch.equal(loaded["model"][name], tensor) and loaded["model"][name].dtype == tensor.dtype
    for key, state in last["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(loaded["optimizer"]["state"][key][name], tensor), (key, name)


def test_half_precision_and_special_values_come_back_exactly() -> None:
    """Each way a correction is coded gives the tensor back, signed zeros and NaN included."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensor = torch.randn(4096).to(dtype)
        tensor[:4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")]).to(dtype)
        approx = (tensor.float() * 1.01).to(dtype)
        for op, enc in correction.candidates(tensor, approx).items():
            back = correction.decode(enc, dtype, tuple(tensor.shape), approx)
            assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8)), (dtype, op)


def _train(tiny: TinyRun, steps: int, checkpointer: Checkpointer | None = None) -> None:
    for _ in range(steps):
        tiny.advance(1)
        if checkpointer is not None:
            checkpointer.step(tiny.step, tiny.model, tiny.opt)


def _resumed(store: str, run: str, lossy: bool, steps: int) -> TinyRun:
    """A job that restarts from the run's latest step and trains ``steps`` more, saving."""
    fresh = TinyRun()
    with torch.no_grad():
        for param in fresh.model.parameters():
            param.add_(1.0)  # not the weights the run had: only the restore can put them back
    with Checkpointer(run, store, every=10) as again:
        if lossy:
            bundle = api.restore(run, store=store, lossy=True)
            checkpoint = api.load_dict(bundle)
            fresh.model.load_state_dict(checkpoint["model"])
            fresh.opt.load_state_dict(checkpoint["optimizer"])
        else:
            checkpoint = again.restore(fresh.model, fresh.opt)
        fresh.step = checkpoint["step"]
        _train(fresh, steps, again)
    return fresh


def test_a_job_resumed_from_an_exact_copy_goes_on_bit_for_bit(tmp_path: Path) -> None:
    never_stopped, stopped = str(tmp_path / "never"), str(tmp_path / "stopped")
    reference = TinyRun()
    with Checkpointer("job", never_stopped, every=10, keep_exact=1) as ckpt:
        _train(reference, 40, ckpt)

    first = TinyRun()
    with Checkpointer("job", stopped, every=10, keep_exact=1) as ckpt:
        _train(first, 20, ckpt)  # stopped after checkpoint 2 (step 20)
    resumed = _resumed(stopped, "job", lossy=False, steps=20)

    assert resumed.step == reference.step == 40
    for (name, got), want in zip(resumed.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(got, want), name
    # The links after the resume were coded against the lossy reconstruction, as in the
    # run that never stopped: they reconstruct the same tensors. (The extras may differ
    # in their bytes: pickle shares equal strings only when they are one object.)
    assert api.exact_steps("job", stopped) == [40]
    for step in (30, 40):
        got = api.restore("job", step, store=stopped, lossy=True)
        want = api.restore("job", step, store=never_stopped, lossy=True)
        assert got.tensors.keys() == want.tensors.keys()
        assert all(torch.equal(got.tensors[name].tensor, entry.tensor)
                   for name, entry in want.tensors.items())

    # Resumed from the lossy reconstruction instead, training drifts off the reference.
    drifted = str(tmp_path / "drifted")
    with Checkpointer("job", drifted, every=10) as ckpt:
        _train(TinyRun(), 20, ckpt)
    lossy = _resumed(drifted, "job", lossy=True, steps=20)
    assert any(not torch.equal(got, want) for got, want in
               zip(lossy.model.parameters(), reference.model.parameters(), strict=True))


def test_a_crash_before_the_exact_record_leaves_nothing_visible(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    checkpoints = _checkpoints(4)
    api.push(checkpoints[0], "r", store=store, keep_exact=1)
    put_if_absent = store.put_if_absent

    def crash(key: str, data: bytes) -> bool:
        if "/exact/commits/" in key:
            raise KeyboardInterrupt("killed before the exact record")
        return put_if_absent(key, data)

    monkeypatch.setattr(store, "put_if_absent", crash)
    with pytest.raises(KeyboardInterrupt):
        api.push(checkpoints[1], "r", store=store)
    monkeypatch.undo()
    orphan = [key for key in store.list("runs/r/exact/archives/") if "000000000010-" in key]
    assert len(orphan) == 1  # the archive is stored, its record is not
    assert api.exact_steps("r", store) == [5]
    assert not _same_bits(api.restore("r", 10, store=store), api.to_bundle(checkpoints[1]))
    ls = CliRunner().invoke(main, ["ls", "--run", "r", "--store", str(root)])
    assert [line.split()[-1] for line in ls.stdout.splitlines()[1:]] == ["yes", "-"]
    assert api.gc("r", store=store).keys == []  # the head's copy may still be being written

    api.push(checkpoints[2], "r", store=store)  # the job goes on
    assert api.exact_steps("r", store) == [15]
    assert api.gc("r", store=store).keys == orphan and not store.exists(orphan[0])
    assert api.gc("r", store=store).keys == []
    assert _same_bits(api.restore("r", 15, store=store), api.to_bundle(checkpoints[2]))

    # Pushing the step again after such a crash gives it its exact copy.
    monkeypatch.setattr(store, "put_if_absent", crash)
    with pytest.raises(KeyboardInterrupt):
        api.push(checkpoints[3], "r", store=store)
    monkeypatch.undo()
    result, _ = api.push(checkpoints[3], "r", store=store)
    assert not result.created and api.exact_steps("r", store) == [20]
    assert _same_bits(api.restore("r", 20, store=store), api.to_bundle(checkpoints[3]))
    assert [r.step for r in ExactCopies(store, "r").records()] == [20]


def test_a_copy_left_by_a_deleted_link_is_garbage(tmp_path: Path) -> None:
    """A delete that died between the link and its exact copy leaves a record of a
    link that is gone: restores ignore it, gc collects it, and the step pushed again
    gets its own copy."""
    store = LocalStore(tmp_path / "s")
    checkpoints = _checkpoints(2)
    for ckpt in checkpoints:
        api.push(ckpt, "r", store=store, keep_exact=2)
    from excp.chain import Chain

    Chain(store, "r").delete(10)  # the link goes; its copy stays behind
    stale = [key for key in store.list("runs/r/exact/") if "000000000010" in key]
    assert len(stale) == 2 and api.exact_steps("r", store) == [5]
    assert api.gc("r", store=store, dry_run=True).keys == sorted(stale, key=lambda k: "/archives/" in k)
    changed = copy.deepcopy(checkpoints[1])
    changed["model"] = {k: v * 2 for k, v in changed["model"].items()}
    assert api.gc("r", store=store).keys and not any(store.exists(key) for key in stale)
    api.push(changed, "r", store=store)
    assert api.exact_steps("r", store) == [5, 10]
    assert _same_bits(api.restore("r", 10, store=store), api.to_bundle(changed))
    ExactCopies(store, "r").drop(10)
    assert api.exact_steps("r", store) == [5] and not store.exists("runs/r/exact/commits/000000000010.json")


def test_bad_keep_exact_and_lossy_restores(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    first, second = _checkpoints(2)
    for bad in (-1, True, "1", 1.5):
        with pytest.raises(InvalidInput, match="keep_exact=.*integer K >= 0"):
            api.push(first, "r", store=store, keep_exact=bad)
        with pytest.raises(InvalidInput, match="keep_exact=.*integer K >= 0"):
            Checkpointer("r", store, keep_exact=bad)
    api.push(first, "r", store=store, keep_exact=1)
    with pytest.raises(InvalidInput, match="newest 1 steps, not 2"):
        api.push(second, "r", store=store, keep_exact=2)
    with pytest.raises(InvalidInput, match="newest 1 steps, not 0"):
        api.push(second, "r", store=store, keep_exact=0)
    api.push(second, "r", store=store, keep_exact=1)
    assert api.exact_steps("r", store) == [10]
    with open_target("excp://127.0.0.1:9") as service, \
            pytest.raises(InvalidInput, match="keep_exact=-1.*integer K >= 0"):
        service.push(first, "r", keep_exact=-1)  # refused before anything is sent

    api.push(first, "exact", store=store, params=PRESETS["lossless"])
    assert api.exact_steps("exact", store) == [5]
    assert _same_bits(api.restore("exact", store=store), api.to_bundle(first))
    with pytest.raises(InvalidInput, match="--mode lossless.*no lossy reconstruction"):
        api.restore("exact", store=store, lossy=True)


def test_a_run_from_before_exact_copies_keeps_none(tmp_path: Path) -> None:
    root = tmp_path / "s"
    first, second = _checkpoints(2)
    api.push(first, "old", store=str(root))
    record = root / "runs" / "old" / "run.json"
    fields = json.loads(record.read_text())
    del fields["keep_exact"]
    record.write_text(json.dumps(fields))
    with pytest.raises(InvalidInput, match="newest 0 steps, not 1"):
        api.push(second, "old", store=str(root), keep_exact=1)
    api.push(second, "old", store=str(root))
    assert api.exact_steps("old", str(root)) == []


def _cli(store: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [*args, "--store", str(store)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_keep_exact_lossy_and_ls(tmp_path: Path) -> None:
    store, files = tmp_path / "s", []
    for i, ckpt in enumerate(_checkpoints(2)):
        files.append(tmp_path / f"ckpt-{i}.pt")
        torch.save(ckpt, files[-1])
    code, _, err = _cli(store, "push", str(files[0]), "--run", "r", "--keep-exact", "-1")
    assert code == 2 and len(err.splitlines()) == 1 and "integer K >= 0" in err
    assert _cli(store, "push", str(files[0]), "--run", "r", "--keep-exact", "1")[0] == 0
    code, _, err = _cli(store, "push", str(files[1]), "--run", "r", "--keep-exact", "3")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("excp: error [invalid_input]: ")
    assert _cli(store, "push", str(files[1]), "--run", "r")[0] == 0
    code, out, _ = _cli(store, "ls", "--run", "r")
    assert code == 0 and out.splitlines()[0].split()[-1] == "exact"
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["-", "yes"]

    assert _cli(store, "restore", "--run", "r", "-o", str(tmp_path / "exact.pt"))[0] == 0
    assert _cli(store, "restore", "--run", "r", "--lossy", "-o", str(tmp_path / "lossy.pt"))[0] == 0
    want = torch.load(files[1], weights_only=True)["model"]
    exact = torch.load(tmp_path / "exact.pt", weights_only=True)["model"]
    lossy = torch.load(tmp_path / "lossy.pt", weights_only=True)["model"]
    assert all(torch.equal(exact[k], v) for k, v in want.items())
    assert not all(torch.equal(lossy[k], v) for k, v in want.items())

    (exact_archive,) = (store / "runs" / "r" / "exact" / "archives").iterdir()
    code, out, _ = _cli(store, "inspect", str(exact_archive))
    assert code == 0 and out.splitlines()[0].startswith("run r step 10 layout torch_dict exact copy of link ")
    rows = out.splitlines()[2:]  # no params line: the table's header, then one row per unit
    assert rows and {row.split()[1] for row in rows} == {"correction"}

    assert _cli(store, "push", str(files[0]), "--run", "l", "--mode", "lossless")[0] == 0
    code, out, err = _cli(store, "restore", "--run", "l", "--lossy", "-o", str(tmp_path / "l.pt"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "--mode lossless" in err


def test_the_callbacks_take_keep_exact(tmp_path: Path) -> None:
    from excp.client.hf import ExcpTrainerCallback
    from excp.client.lightning import ExcpLightningCallback

    store = str(tmp_path / "s")
    for callback in (ExcpTrainerCallback, ExcpLightningCallback):
        made = callback("r", store, keep_exact=2)
        assert made.checkpointer.keep_exact == 2
        made.close()
        with pytest.raises(InvalidInput, match="keep_exact=-1"):
            callback("r", store, keep_exact=-1)
