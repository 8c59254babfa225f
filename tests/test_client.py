"""The client against a real ``excp serve`` on 127.0.0.1: every REST call with typed
results and typed errors, retries, the training-loop hook on a directory store and on
the service backed by moto's S3 server, the service going away mid-run, and a
training process killed mid-save."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from excp import api
from excp.adapters import load_checkpoint
from excp.api import BaseSpec
from excp.chain import Commit
from excp.client import Checkpointer, Client, StoreTarget, open_target, restore
from excp.codec.params import PRESETS
from excp.errors import (
    Conflict,
    CorruptData,
    ExcpError,
    Forbidden,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
)
from excp.store import LocalStore
from tests.conftest import TinyRun
from tests.factories import mlp
from tests.s3_fixtures import moto_api, moto_endpoint  # noqa: F401 (fixture)
from tests.serve_fixtures import ADMIN, READER_A, TEAM_A, TEAM_B, Server, free_port, new_backend

FAST = {"retries": 2, "backoff": 0.05, "max_backoff": 0.2, "timeout": 60.0}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("client-serve")
    server = Server(root, new_backend("local", root, request)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("client-serve-s3")
    server = Server(root, new_backend("s3", root, request)).start()
    yield server
    server.stop()
    moto_api(server.backend.endpoint, "reset")


def _address(server: Server) -> str:
    return f"excp://127.0.0.1:{server.port}"


def _equal_states(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


# --- the REST client ------------------------------------------------------------------


def test_every_call_of_the_service(local_server: Server, tmp_path: Path) -> None:
    run, store = "team-a-calls", local_server.store
    with Client(_address(local_server), TEAM_A, **FAST) as client:
        assert client.health()
        assert client.ready()["status"] == "ready"
        info = client.create_run(run, "default", {"keyframe_every": 3})
        assert info.name == run and info.params == PRESETS["default"].replace(keyframe_every=3)
        assert info.head is None and info.checkpoints == 0
        assert client.create_run(run, "default", {"keyframe_every": 3}).name == run  # same options: no-op
        with pytest.raises(Conflict, match="already exists with other options"):
            client.create_run(run, "max")

        tiny = TinyRun()
        for step in (5, 10):
            checkpoint = tmp_path / f"{step}.pt"
            torch.save(tiny.advance(5), checkpoint)
            pushed = client.upload_raw(run, step, checkpoint)
            assert pushed.created and pushed.commit.step == step
        again = client.upload_raw(run, 10, tmp_path / "10.pt")
        assert not again.created and again.commit == pushed.commit

        listed = client.checkpoints(run)
        assert [c.step for c in listed] == [5, 10] and listed == api.list_commits(run, store)
        assert client.meta(run, "latest") == listed[-1] == client.run(run).head
        assert run in client.runs()

        out = client.restore(run, "latest", tmp_path / "latest.pt")
        assert (out.step, out.layout) == (10, "torch_dict") and out.size == out.path.stat().st_size
        served = torch.load(out.path, weights_only=True)
        local = api.load_dict(api.restore(run, 10, store=store))
        assert _equal_states(served["model"], local["model"])

        with open(tmp_path / "a.excp", "w+b") as archive:
            client.download_archive(run, listed[0], archive)
            assert archive.read() == store.get(listed[0].archive)
            forged = Commit(**{**listed[0].__dict__, "digest": "0" * 32})
            with pytest.raises(CorruptData, match="does not match its commit record"):
                client.download_archive(run, forged, archive)
        text = client.metrics()
        assert "excp_" in text

        with pytest.raises(Forbidden):
            client.delete_checkpoint(run, 10)
        with pytest.raises(NotFound, match="has no step 7"):
            client.meta(run, 7)
        with pytest.raises(InvalidInput, match="is not a file"):
            client.upload_raw(run, 15, tmp_path / "missing.pt")
    with Client(_address(local_server), ADMIN, **FAST) as admin:
        with pytest.raises(Conflict, match="needed to restore steps 10"):
            admin.delete_checkpoint(run, 5)
        admin.delete_checkpoint(run, 10)
        assert [c.step for c in admin.checkpoints(run)] == [5]
        admin.delete_run(run)
        with pytest.raises(NotFound):
            admin.run(run)


def test_tokens_and_addresses(local_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCP_TOKEN", READER_A)
    with Client(_address(local_server), **FAST) as reader:  # the token from the environment
        with pytest.raises(Forbidden):
            reader.create_run("team-a-read-only")
    with Client(_address(local_server), "not-a-token", **FAST) as stranger:
        with pytest.raises(Unauthorized):
            stranger.runs()
    with Client(f"http://127.0.0.1:{local_server.port}/", TEAM_B, **FAST) as team_b:
        with pytest.raises(Forbidden):
            team_b.run("team-a-calls")
    for bad in ("ftp://host", "excp://", "127.0.0.1:8080"):
        with pytest.raises(InvalidInput, match="is not excp://HOST:PORT"):
            Client(bad)
    with pytest.raises(InvalidInput, match="a token is for an excp service"):
        open_target("/tmp/somewhere", token="abc")
    with pytest.raises(InvalidInput, match="retries= is for an excp service"):
        open_target("/tmp/somewhere", retries=3)
    with pytest.raises(InvalidInput, match="unknown option 'retriez'"):
        open_target(_address(local_server), retriez=3)


class _Flaky(BaseHTTPRequestHandler):
    """Answers errors (503, 429, ...) before a valid run description: a service behind
    an overloaded proxy. Counts the requests it saw."""

    answers: list[int] = []
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        status = self.answers.pop(0) if self.answers else 200
        body = {"error": {"code": "store_unavailable", "message": "try later"}} if status != 200 else {
            "name": "r", "params": PRESETS["default"].to_dict(), "base": None, "created_at": 1.0,
            "head": None, "checkpoints": 0, "keyframes": 0, "stored_bytes": 0, "raw_bytes": 0, "ratio": None}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Flaky.seen.clear()
    yield f"excp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_retries_on_5xx_429_and_408_then_gives_up(flaky: str) -> None:
    _Flaky.answers[:] = [503, 429, 502, 408]
    with Client(flaky, retries=4, backoff=0.01, max_backoff=0.02) as client:
        assert client.run("r").name == "r"
    assert len(_Flaky.seen) == 5
    _Flaky.answers[:] = [503] * 5
    _Flaky.seen.clear()
    with Client(flaky, retries=2, backoff=0.01, max_backoff=0.02) as client, \
            pytest.raises(StoreUnavailable, match="try later"):
        client.run("r")
    assert len(_Flaky.seen) == 3


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "excp.client" and "retrying" in r.getMessage()]


def test_a_refused_connection_is_retried_once_then_named(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listening is not a failure to wait out: one quick retry (a service still
    starting), then one line saying so. Retries are INFO: not shown at the default level."""
    caplog.set_level(logging.INFO, logger="excp.client")
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=6, backoff=0.01) as client, pytest.raises(ServiceUnavailable) as caught:
        client.runs()
    assert caught.value.message == (f"cannot reach the excp service at {url}: connection refused; "
                                    "start it with `excp serve` or check --server")
    assert [r.levelno for r in _retry_lines(caplog)] == [logging.INFO]
    caplog.clear()
    with Client(url, retries=3, backoff=0.01, retry_refused=True) as client, \
            pytest.raises(ServiceUnavailable, match="connection refused"):
        client.runs()
    assert len(_retry_lines(caplog)) == 3


def test_a_missing_run_or_step_names_the_service_not_its_store(local_server: Server) -> None:
    """Whether the service says it (a run it does not have) or the client's mirror of the
    run does (a step it does not have), the message names the service and how to list
    it from here, never the service's store path or a plain `excp ls`."""
    url, run = f"http://127.0.0.1:{local_server.port}", "team-a-not-found"
    api.push(TinyRun().advance(2), run, step=2, store=local_server.store)
    with open_target(_address(local_server), TEAM_A, **FAST) as target:
        with pytest.raises(NotFound) as no_run:
            target.commits("team-a-nope")
        with pytest.raises(NotFound) as no_step_here:
            target.restore(run, 9)
        with pytest.raises(NotFound) as no_step_there:
            target.client.meta(run, 9)
    assert no_run.value.message == (f"run 'team-a-nope' does not exist on the excp service at {url}: "
                                    f"check the name with `excp ls --server {url}`")
    for caught in (no_step_here, no_step_there):
        assert caught.value.message == (f"run '{run}' has no step 9: list its steps with "
                                        f"`excp ls --server {url} --run {run}`")


# --- the hook -----------------------------------------------------------------------


def _train_with_hook(checkpointer: Checkpointer, tiny: TinyRun, steps: int, lr_note: str = "x") -> None:
    for _ in range(steps):
        tiny.advance(1)
        checkpointer.step(tiny.step, tiny.model, tiny.opt, note=lr_note)


def _assert_restores_like_local(target: str | None, run: str, store, step: int,
                                token: str | None = None) -> TinyRun:
    fresh = TinyRun(seed=7)
    checkpoint = restore(run, step, fresh.model, fresh.opt, target=target, token=token)
    local = api.load_dict(api.restore(run, step, store=store))
    assert checkpoint["step"] == step and checkpoint["note"] == "x"
    assert _equal_states(fresh.model.state_dict(), local["model"])
    for key, state in local["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(fresh.opt.state_dict()["state"][key][name], tensor), (key, name)
    return fresh


def _continue(fresh: TinyRun, steps: int = 20) -> None:
    before = fresh.loss().item()
    fresh.advance(steps)
    after = fresh.loss().item()
    assert after < before and after == after


def test_hook_on_a_directory_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tiny = TinyRun()
    with Checkpointer("hook", str(store), every=10, preset="default") as ckpt:
        _train_with_hook(ckpt, tiny, 50)
    assert ckpt.stats.committed == 5 and ckpt.stats.failed == 0 and ckpt.stats.skipped == 0
    commits = api.list_commits("hook", str(store))
    assert [c.step for c in commits] == [10, 20, 30, 40, 50]
    assert [c.parent for c in commits] == [None, 10, 20, 30, 40]
    assert ckpt.stats.commits == commits and ckpt.stats.ratio > 5
    _continue(_assert_restores_like_local(str(store), "hook", str(store), 30))

    # A restarted job resumes, then keeps pushing links against what it restored.
    resumed = TinyRun(seed=3)
    with Checkpointer("hook", str(store), every=10) as again:
        loaded = again.restore(resumed.model, resumed.opt)
        assert loaded["step"] == 50
        resumed.step = 50
        _train_with_hook(again, resumed, 20)
    later = api.list_commits("hook", str(store))[-2:]
    assert [(c.step, c.parent) for c in later] == [(60, 50), (70, 60)]
    assert api.verify("hook", store=str(store)).checkpoints == 7


def test_hook_through_the_service_on_s3(s3_server: Server) -> None:
    run, target = "team-a-hook", _address(s3_server)
    tiny = TinyRun()
    with Checkpointer(run, target, every=10, token=TEAM_A, **FAST) as ckpt:
        _train_with_hook(ckpt, tiny, 40)
    assert [c.step for c in api.list_commits(run, s3_server.store)] == [10, 20, 30, 40]
    assert ckpt.stats.committed == 4
    fresh = _assert_restores_like_local(target, run, s3_server.store, 20, token=TEAM_A)
    _continue(fresh)
    with Checkpointer(run, target, token=TEAM_A, **FAST) as fresh_job:
        assert fresh_job.restore(step=40)["step"] == 40


def test_the_service_going_away_mid_run(tmp_path: Path, request: pytest.FixtureRequest,
                                        caplog: pytest.LogCaptureFixture) -> None:
    server = Server(tmp_path, new_backend("local", tmp_path, request)).start()
    run, tiny = "team-a-outage", TinyRun()
    try:
        ckpt = Checkpointer(run, _address(server), every=10, token=TEAM_A, **FAST)
        _train_with_hook(ckpt, tiny, 20)
        ckpt.wait()
        port = server.port
        server.kill()
        caplog.set_level(logging.INFO, logger="excp.client")
        _train_with_hook(ckpt, tiny, 10)  # step 30 is saved while the service is down
        with pytest.raises(ServiceUnavailable, match="step 30 was not saved") as failure:
            ckpt.wait()
        # The hook retries refused connections like any failure: a restart refuses them for a while.
        assert len(_retry_lines(caplog)) == FAST["retries"] and TEAM_A not in caplog.text
        assert isinstance(failure.value, ExcpError) and ckpt.stats.failed == 1
        server.start(port)
        _train_with_hook(ckpt, tiny, 20)
        ckpt.close()
    finally:
        server.stop()
    commits = api.list_commits(run, server.store)
    assert [c.step for c in commits] == [10, 20, 40, 50]
    assert commits[2].parent == 20  # coded against the last step the service holds
    assert api.verify(run, store=server.store).checkpoints == 4
    _assert_restores_like_local(str(server.backend.directory), run, server.store, 50)


def test_hook_through_the_service_from_a_seed_base(local_server: Server) -> None:
    """A run that starts from weights rebuilt from a seed: the first link is coded here
    against the same base the service rebuilt, and restores agree on both sides."""
    run, base = "team-a-seeded", BaseSpec(3, "tests.factories:mlp")
    model = mlp(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(64, 16)
    with Checkpointer(run, _address(local_server), every=5, token=TEAM_A, base=base, **FAST) as ckpt:
        for step in range(1, 11):
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()
            ckpt.step(step, model, optimizer)
    commits = api.list_commits(run, local_server.store)
    assert [(c.step, c.parent, c.keyframe) for c in commits] == [(5, None, False), (10, 5, False)]
    here = restore(run, 10, target=_address(local_server), token=TEAM_A, base=base)
    there = api.load_dict(api.restore(run, 10, store=local_server.store, base=base))
    assert _equal_states(here["model"], there["model"])


class _Gated(StoreTarget):
    """A store target whose pushes wait for the test to open a gate, or fail."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalStore(root))
        self.gate = threading.Event()
        self.fail = False

    def push(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 (the base's signature)
        self.gate.wait(30)
        if self.fail:
            raise StoreUnavailable("the bucket is gone")
        return super().push(*args, **kwargs)


def test_busy_policies_and_failures(tmp_path: Path) -> None:
    tiny = TinyRun()
    target = _Gated(tmp_path / "s")
    skipping = Checkpointer("busy", target, every=1, when_busy="skip")
    assert skipping.save(1, tiny.model, tiny.opt)
    assert not skipping.save(2, tiny.model, tiny.opt)  # step 1 is still in flight
    assert skipping.stats.skipped == 1
    target.gate.set()
    skipping.wait()
    assert [c.step for c in api.list_commits("busy", target.store)] == [1]

    target.gate.clear()
    waiting = Checkpointer("busy", target, every=1)
    assert waiting.save(3, tiny.model, tiny.opt)
    threading.Timer(0.2, target.gate.set).start()
    assert waiting.save(4, tiny.model, tiny.opt)  # waits for step 3
    assert waiting.stats.waited_s > 0
    waiting.wait()
    assert [c.step for c in api.list_commits("busy", target.store)] == [1, 3, 4]

    target.fail = True
    assert waiting.save(5, tiny.model, tiny.opt)
    with pytest.raises(StoreUnavailable, match="step 5 was not saved: the bucket is gone"):
        waiting.step(6, tiny.model, tiny.opt)  # surfaced at the next step
    target.fail = False
    assert waiting.save(6, tiny.model, tiny.opt)
    waiting.close()
    assert [c.step for c in api.list_commits("busy", target.store)] == [1, 3, 4, 6]
    with pytest.raises(InvalidInput, match="closed"):
        waiting.save(7, tiny.model, tiny.opt)


def test_snapshot_is_taken_before_training_goes_on(tmp_path: Path) -> None:
    """The loop may change its tensors right after ``save`` returns: the pushed
    checkpoint is the state at the call, even though it is coded later."""
    tiny, store = TinyRun(), str(tmp_path / "s")
    target = _Gated(tmp_path / "s")
    ckpt = Checkpointer("snap", target, every=1, preset="lossless")
    want = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    ckpt.save(1, tiny.model, tiny.opt)
    tiny.advance(3)
    target.gate.set()
    ckpt.close()
    got = api.load_dict(api.restore("snap", 1, store=store))["model"]
    assert _equal_states(got, want)


def test_hook_bad_input(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with pytest.raises(InvalidInput, match="every=0"):
        Checkpointer("r", store, every=0)
    with pytest.raises(InvalidInput, match="when_busy='later'"):
        Checkpointer("r", store, when_busy="later")
    with pytest.raises(InvalidInput, match="unknown preset|preset"):
        Checkpointer("r", store, preset="fastest")
    with pytest.raises(InvalidInput, match="invalid run name"):
        Checkpointer("bad name!", store)
    with pytest.raises(InvalidInput, match="is a str"):
        Checkpointer("r", store).save(1, "model")
    tiny = TinyRun()
    with pytest.raises(NotFound, match="does not exist"):
        restore("nothing-here", target=store, model=tiny.model)
    assert Checkpointer("nothing-here", store).restore(tiny.model) is None  # a fresh run starts
    api.push(tiny.advance(1)["model"], "weights-only", step=1, store=store)
    with pytest.raises(InvalidInput, match="holds no optimizer state"):
        restore("weights-only", target=store, model=tiny.model, optimizer=tiny.opt)


_KILLED_JOB = """
import sys, time, torch
sys.path.insert(0, {root!r})
from tests.conftest import TinyRun
from tests.factories import mlp
from excp.client import Checkpointer
torch.manual_seed(0)
tiny = TinyRun()
tiny.model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
tiny.opt = torch.optim.AdamW(tiny.model.parameters(), lr=1e-3)
tiny.data, tiny.target = torch.randn(64, 256), torch.randn(64, 256)
ckpt = Checkpointer("killed", {store!r}, every=1, preset="lossless")
for step in range(1, 1000):
    tiny.advance(1)
    ckpt.step(step, tiny.model, tiny.opt)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_training_job_killed_mid_save_commits_nothing_partial(tmp_path: Path) -> None:
    store = tmp_path / "s"
    job = subprocess.Popen([sys.executable, "-c", _KILLED_JOB.format(root=str(Path(__file__).parent.parent),
                                                                     store=str(store))],
                           stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    commits_dir = store / "runs" / "killed" / "commits"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(commits_dir.glob("*.json"))) < 3:
        time.sleep(0.05)
    time.sleep(0.13)  # somewhere inside a save
    os.kill(job.pid, signal.SIGKILL)
    job.wait(30)
    commits = api.list_commits("killed", str(store))
    assert len(commits) >= 3
    assert api.verify("killed", store=str(store)).checkpoints == len(commits)
    archives = {p.name for p in (store / "runs" / "killed" / "archives").iterdir()}
    assert {c.archive.rsplit("/", 1)[-1] for c in commits} <= archives
    last = api.load_dict(api.restore("killed", "latest", store=str(store)))
    assert last["step"] == commits[-1].step


def test_restore_a_trainer_directory_needs_out(tmp_path: Path) -> None:
    from tests.test_adapters import trainer_dir

    model, _ = trainer_dir(tmp_path / "checkpoint-3", tmp_path / "marker")
    store = str(tmp_path / "s")
    order = [n for n, _ in model.named_parameters()]
    api.push(load_checkpoint(load := tmp_path / "checkpoint-3", param_order=order), "hf", step=3, store=store)
    with pytest.raises(InvalidInput, match="restore with out=DIR"):
        restore("hf", 3, model=model, target=store)
    bundle = restore("hf", 3, target=store, out=tmp_path / "back")
    assert bundle.layout == "hf_trainer" and (tmp_path / "back" / "model.safetensors").is_file()
    assert load.is_dir()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from excp.cli import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_cli_through_the_service(local_server: Server, tmp_path: Path) -> None:
    run, server = "team-a-cli", _address(local_server)
    env = {"EXCP_TOKEN": TEAM_A}
    tiny = TinyRun()
    for step in (5, 10, 15):
        torch.save(tiny.advance(5), tmp_path / f"{step}.pt")
        pushed = _cli("push", str(tmp_path / f"{step}.pt"), "--run", run, "--server", server, env=env)
        assert pushed.returncode == 0 and f"step {step} committed" in pushed.stdout, pushed.stderr
    listed = _cli("ls", "--run", run, env={**env, "EXCP_SERVER": server})
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()[1:]] == \
        ["5", "10", "15"]
    assert run in _cli("ls", "--server", server, env=env).stdout
    restored = _cli("restore", "--run", run, "--step", "10", "-o", str(tmp_path / "r10.pt"),
                    "--server", server, env=env)
    assert restored.returncode == 0, restored.stderr
    local = api.load_dict(api.restore(run, 10, store=local_server.store))
    assert _equal_states(torch.load(tmp_path / "r10.pt", weights_only=True)["model"], local["model"])
    rebuilt = _cli("rebuild", "--run", run, "-o", str(tmp_path / "all"), "--server", server, env=env)
    assert rebuilt.returncode == 0 and "wrote 3 checkpoints" in rebuilt.stdout, rebuilt.stderr
    for step in (5, 10, 15):
        want = api.load_dict(api.restore(run, step, store=local_server.store))["model"]
        got = torch.load(tmp_path / "all" / f"step-{step:012d}.pt", weights_only=True)["model"]
        assert _equal_states(got, want)
    verified = _cli("verify", "--run", run, "--server", server, env=env)
    assert verified.returncode == 0 and "ok: 3 checkpoints" in verified.stdout
    inspected = _cli("inspect", "--run", run, "--step", "15", "--json", "--server", server, env=env)
    assert json.loads(inspected.stdout)["header"]["step"] == 15

    both = _cli("ls", "--store", str(tmp_path), "--server", server, env=env)
    assert both.returncode == 2 and "give one of them" in both.stderr
    not_url = _cli("ls", "--server", str(tmp_path), env=env)
    assert not_url.returncode == 2 and "is not a service URL" in not_url.stderr
    denied = _cli("push", str(tmp_path / "5.pt"), "--run", "team-b-x", "--server", server, env=env)
    assert denied.returncode == 8 and "[forbidden]" in denied.stderr and "Traceback" not in denied.stderr
