"""Exact copies through a real ``excp serve`` on 127.0.0.1: archive uploads from the CLI
and the training-loop hook, raw uploads the server compresses, exact and lossy restores
both ways (decoded here from downloaded archives, or by the service), retention in the
server's store, and every bad option or upload refused in one line, committing nothing."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import requests
import torch
from click.testing import CliRunner

from excp import api
from excp.cli import main
from excp.client import Checkpointer, Client, open_target, restore
from excp.errors import Conflict, InvalidInput
from excp.exact import ExactCopies, encode_copy
from tests.conftest import TinyRun
from tests.serve_fixtures import ADMIN, TEAM_A, Server, auth, new_backend

FAST = {"retries": 2, "backoff": 0.05, "max_backoff": 0.2, "timeout": 60.0}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical training for the resumed job
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("exact-serve")
    started = Server(root, new_backend("local", root, request)).start()
    yield started
    started.stop()


def _address(server: Server) -> str:
    return f"excp://127.0.0.1:{server.port}"


def _checkpoints(n: int, every: int = 5) -> list[dict]:
    tiny = TinyRun()
    return [copy.deepcopy(tiny.advance(every)) for _ in range(n)]


def _same_states(got: dict, want: dict) -> bool:
    """Every tensor equal, with the same dtype."""
    return got.keys() == want.keys() and all(
        got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())


def _same_checkpoint(got: dict, want: dict) -> bool:
    """The model and every optimizer state tensor bit for bit, and the rest equal."""
    states = zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True)
    return (_same_states(got["model"], want["model"]) and all(_same_states(g, w) for g, w in states)
            and got["step"] == want["step"] and got["meta"] == want["meta"])


def _exact_steps_in_store(server: Server, run: str) -> list[int]:
    """The exact records in the server's store, and that each has its one archive."""
    records = ExactCopies(server.store, run).records()
    archives = list((server.backend.directory / "runs" / run / "exact" / "archives").iterdir())
    assert sorted(str(a.relative_to(server.backend.directory)) for a in archives) == \
        sorted(r.archive for r in records)
    return [r.step for r in records]


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"EXCP_TOKEN": TEAM_A})
    return result.exit_code, result.stdout, result.stderr


def test_cli_pushes_and_restores_exact_copies_through_the_service(server: Server, tmp_path: Path) -> None:
    run, url = "team-a-exact-cli", _address(server)
    checkpoints, files = _checkpoints(3), []
    for i, ckpt in enumerate(checkpoints):
        files.append(tmp_path / f"ckpt-{i}.pt")
        torch.save(ckpt, files[-1])
        code, out, err = _cli("push", str(files[-1]), "--run", run, "--server", url, "--keep-exact", "1")
        assert code == 0, err
    assert _exact_steps_in_store(server, run) == [15]
    code, out, _ = _cli("ls", "--run", run, "--server", url)
    assert code == 0 and out.splitlines()[0].split()[-1] == "exact"
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["-", "-", "yes"]

    # Decoded here, from the downloaded links and the exact copy.
    for name, *options in [("exact",), ("lossy", "--lossy"), ("10", "--step", "10")]:
        out = str(tmp_path / f"{name}.pt")
        code, _, err = _cli("restore", "--run", run, "--server", url, "-o", out, *options)
        assert code == 0, err
    want = torch.load(files[2], weights_only=True)
    assert _same_checkpoint(torch.load(tmp_path / "exact.pt", weights_only=True), want)
    lossy = torch.load(tmp_path / "lossy.pt", weights_only=True)
    assert not _same_states(lossy["model"], want["model"])
    reconstruction = api.load_dict(api.restore(run, store=server.store, lossy=True))
    assert _same_states(lossy["model"], reconstruction["model"])
    older = torch.load(tmp_path / "10.pt", weights_only=True)
    assert not _same_states(older["model"], checkpoints[1]["model"])
    assert _same_states(older["model"], api.load_dict(api.restore(run, 10, store=server.store))["model"])

    # Reconstructed by the service.
    with Client(url, TEAM_A, **FAST) as client:
        assert client.restore(run, "latest", tmp_path / "s-exact.pt").step == 15
        client.restore(run, "latest", tmp_path / "s-lossy.pt", lossy=True)
        assert [r.step for r in client.run(run).exact] == [15] and client.run(run).keep_exact == 1
    assert _same_checkpoint(torch.load(tmp_path / "s-exact.pt", weights_only=True), want)
    assert _same_states(torch.load(tmp_path / "s-lossy.pt", weights_only=True)["model"], lossy["model"])

    code, _, err = _cli("push", str(files[2]), "--run", run, "--server", url, "--keep-exact", "2")
    assert code == 2 and len(err.splitlines()) == 1 and "newest 1 steps, not 2" in err
    code, _, err = _cli("push", str(files[2]), "--run", "team-a-exact-bad", "--server", url,
                        "--keep-exact", "-1")
    assert code == 2 and len(err.splitlines()) == 1 and "integer K >= 0" in err
    assert run in _cli("ls", "--server", url)[1] and "team-a-exact-bad" not in _cli("ls", "--server", url)[1]


def _train(tiny: TinyRun, steps: int, checkpointer: Checkpointer | None = None) -> None:
    for _ in range(steps):
        tiny.advance(1)
        if checkpointer is not None:
            checkpointer.step(tiny.step, tiny.model, tiny.opt)


def test_a_hooked_job_resumed_through_the_service_goes_on_bit_for_bit(server: Server) -> None:
    run, url = "team-a-exact-hook", _address(server)
    reference = TinyRun()
    _train(reference, 40)

    first = TinyRun()
    with Checkpointer(run, url, every=10, keep_exact=1, token=TEAM_A, **FAST) as ckpt:
        _train(first, 20, ckpt)  # stopped after its save at step 20
    assert _exact_steps_in_store(server, run) == [20]

    fresh = TinyRun()
    with torch.no_grad():
        for param in fresh.model.parameters():
            param.add_(1.0)  # not the weights the run had: only the restore can put them back
    with Checkpointer(run, url, every=10, token=TEAM_A, **FAST) as again:
        fresh.step = again.restore(fresh.model, fresh.opt)["step"]
        assert fresh.step == 20
        _train(fresh, 20, again)
    for (name, got), want in zip(fresh.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(got, want), name
    assert _exact_steps_in_store(server, run) == [40]
    with open_target(url, TEAM_A, **FAST) as service:
        assert service.exact_steps(run) == [40]
        commits = service.commits(run)
        assert [c.step for c in commits] == [10, 20, 30, 40]
        (record,) = ExactCopies(server.store, run).records()
        assert service.verify(run).bytes_checked == sum(c.size for c in commits) + record.size
    lossy = restore(run, target=url, token=TEAM_A, lossy=True)
    assert not torch.equal(lossy["model"]["0.weight"], reference.model.state_dict()["0.weight"])
    assert torch.equal(restore(run, target=url, token=TEAM_A)["model"]["0.weight"],
                       reference.model.state_dict()["0.weight"])


def test_raw_uploads_keep_exact_copies(server: Server, tmp_path: Path) -> None:
    run = "team-a-exact-raw"
    checkpoints = _checkpoints(3)
    with Client(_address(server), TEAM_A, **FAST) as client:
        assert client.create_run(run, keep_exact=1).keep_exact == 1
        for ckpt in checkpoints:
            torch.save(ckpt, tmp_path / "up.pt")
            assert client.upload_raw(run, ckpt["step"], tmp_path / "up.pt").created
        assert [r.step for r in client.run(run).exact] == [15]
        client.restore(run, 15, tmp_path / "exact.pt")
        client.restore(run, 15, tmp_path / "lossy.pt", lossy=True)
        client.restore(run, 10, tmp_path / "older.pt")
    assert _exact_steps_in_store(server, run) == [15]
    assert _same_checkpoint(torch.load(tmp_path / "exact.pt", weights_only=True), checkpoints[2])
    lossy = torch.load(tmp_path / "lossy.pt", weights_only=True)["model"]
    assert not _same_states(lossy, checkpoints[2]["model"])
    assert _same_states(lossy, api.load_dict(api.restore(run, 15, store=server.store, lossy=True))["model"])
    older = torch.load(tmp_path / "older.pt", weights_only=True)["model"]
    assert not _same_states(older, checkpoints[1]["model"])
    with open_target(_address(server), TEAM_A, **FAST) as service:
        assert _same_checkpoint(api.load_dict(service.restore(run, 15)), checkpoints[2])


def test_a_deleted_step_takes_its_exact_copy_with_it(server: Server, tmp_path: Path) -> None:
    """Deleting the head through the service drops its copy too, so the step pushed
    again gets an exact copy of its own."""
    run = "team-a-exact-delete"
    checkpoints = _checkpoints(2)
    with Client(_address(server), TEAM_A, **FAST) as client:
        client.create_run(run, keep_exact=2)
        for ckpt in checkpoints:
            torch.save(ckpt, tmp_path / "up.pt")
            client.upload_raw(run, ckpt["step"], tmp_path / "up.pt")
    with Client(_address(server), ADMIN, **FAST) as admin:
        admin.delete_checkpoint(run, 10)
    assert _exact_steps_in_store(server, run) == [5]
    changed = copy.deepcopy(checkpoints[1])
    changed["model"] = {k: v + 1 for k, v in changed["model"].items()}
    torch.save(changed, tmp_path / "up.pt")
    with Client(_address(server), TEAM_A, **FAST) as client:
        assert client.upload_raw(run, 10, tmp_path / "up.pt").created
        assert [r.step for r in client.run(run).exact] == [5, 10]
        client.restore(run, 10, tmp_path / "again.pt")
    assert _same_checkpoint(torch.load(tmp_path / "again.pt", weights_only=True), changed)


def test_bad_keep_exact_is_one_line(server: Server) -> None:
    server.create("team-a-exact-k", keep_exact=1)
    for body, status, words in [({"keep_exact": -1}, 400, "integer K >= 0"),
                                ({"keep_exact": "1"}, 400, "keep_exact"),
                                ({"keep_exact": 2}, 409, "newest 1 steps, not 2"),
                                ({}, 409, "newest 1 steps, not 0")]:
        answer = server.create("team-a-exact-k", **body)
        error = answer.json()["error"]
        assert answer.status_code == status and words in error["message"], (body, answer.text)
        assert "\n" not in error["message"] and error["code"] in ("invalid_input", "conflict")
    assert server.create("team-a-exact-k", keep_exact=1).status_code == 200
    with open_target(_address(server), TEAM_A, **FAST) as service, \
            pytest.raises(InvalidInput, match="newest 1 steps, not 3"):
        service.push(_checkpoints(1)[0], "team-a-exact-k", keep_exact=3)


def _put_exact(server: Server, run: str, step: int, body: bytes) -> requests.Response:
    return requests.put(server.url(f"/v1/runs/{run}/checkpoints/{step}/exact"), data=body,
                        headers=auth(TEAM_A), timeout=60)


def _copy_of(run: str, step: int, link_digest: str, checkpoint: dict, server: Server, out: BinaryIO) -> None:
    """An exact copy of ``step`` whose header names ``link_digest`` as its link."""
    commit = dataclasses.replace(api.list_commits(run, server.store)[[5, 10].index(step)], digest=link_digest)
    lossy = api.restore(run, step, store=server.store, lossy=True)
    encode_copy(run, api.to_bundle(checkpoint), lossy, commit, 3, out)
    out.seek(0)


def test_an_exact_upload_for_another_link_is_refused_and_commits_nothing(server: Server) -> None:
    run = "team-a-exact-bad-link"
    checkpoints = _checkpoints(2)
    with open_target(_address(server), TEAM_A, **FAST) as service:
        for ckpt in checkpoints:
            service.push(ckpt, run, keep_exact=1)
    commits = api.list_commits(run, server.store)
    before = ExactCopies(server.store, run).records()
    assert [r.step for r in before] == [10]

    with Client(_address(server), TEAM_A, **FAST) as client:
        for step, link in [(5, commits[1].digest), (10, commits[0].digest)]:
            with tempfile.TemporaryFile() as body:
                _copy_of(run, step, link, checkpoints[[5, 10].index(step)], server, body)
                with pytest.raises(Conflict, match=f"step {step} is committed as link "):
                    client.upload_exact(run, step, body)
                body.seek(0)
                data = bytearray(body.read())
            answer = server.put_archive(run, step, bytes(data))  # the link route refuses a copy too
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_input"
            data[len(data) // 2] ^= 0xFF
            answer = _put_exact(server, run, step, bytes(data))
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "corrupt_data"
        with tempfile.TemporaryFile() as body:
            _copy_of(run, 5, commits[0].digest, checkpoints[0], server, body)
            assert client.upload_exact(run, 5, body)[1]  # the right link: committed, then past retention
    assert ExactCopies(server.store, run).records() == before
    assert _exact_steps_in_store(server, run) == [10]
    assert api.exact_steps(run, server.store) == [10]
    assert server.get(f"/v1/runs/{run}/checkpoints/5/exact").status_code == 404
    assert server.get(f"/v1/runs/{run}/checkpoints/latest/exact").headers["X-Excp-Digest"] == before[0].digest

    with tempfile.TemporaryFile() as body:
        _copy_of(run, 10, commits[1].digest, checkpoints[1], server, body)
        copy_bytes = body.read()
    answer = _put_exact(server, run, 15, copy_bytes)  # no such step
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    with open_target(_address(server), TEAM_A, **FAST) as service:
        service.push(checkpoints[0], "team-a-exact-none")
    answer = _put_exact(server, "team-a-exact-none", 5, copy_bytes)
    assert answer.status_code == 400 and "keeps no exact copies" in answer.json()["error"]["message"]
    assert not (server.backend.directory / "runs" / "team-a-exact-none" / "exact").exists()

