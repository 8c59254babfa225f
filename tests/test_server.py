"""The REST service end to end: a real ``excp serve`` on 127.0.0.1, talked to over HTTP.

Archives are coded client-side with ``encode_archive`` against the head's
reconstruction, as a training node does, and every restore is compared bit for bit
with ``excp.api.restore`` on the same store.

The tests that take ``server`` (and the kill test) run twice: against a directory store
and against moto's S3 server, which runs in this process and which the service's
subprocess reaches over HTTP (so racing commits are decided by moto, atomically: see
``tests/s3_fixtures.py``). Tests of what does not depend on the store (tokens, names,
limits, metrics) are marked ``local_only``.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from excp import api
from excp.chain import RUN_NAME, Chain, Commit, encode_archive
from excp.codec.params import PRESETS, CodecParams
from tests.factories import mlp
from tests.s3_fixtures import (
    admin,
    moto_api,
    moto_endpoint,  # noqa: F401 (a fixture, started only if an S3 test runs)
)
from tests.serve_fixtures import (
    ADMIN,
    ARCHIVE_ROUTE,
    DEADLINE,
    MAX_BODY,
    READER_A,
    STORES,
    TEAM_A,
    TEAM_B,
    Server,
    auth,
    free_port,
    new_backend,
)
from tests.test_adapters import files_of, trainer_dir


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The test process trains and codes tiny models, where a second intra-op thread
    only adds synchronisation; on a busy machine (2 cores shared with other jobs) its
    spin-waits made ten steps of the tiny run take 2 s instead of 0.02 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
            ) -> Iterator[Callable[[str], Server]]:
    """One service per kind of store for the module, started when first asked for."""
    started: dict[str, Server] = {}

    def get(kind: str) -> Server:
        if kind not in started:
            root = tmp_path_factory.mktemp(f"serve-{kind}")
            started[kind] = Server(root, new_backend(kind, root, request)).start()
        return started[kind]

    yield get
    for running in started.values():
        running.stop()
        if running.backend.endpoint is not None:
            moto_api(running.backend.endpoint, "reset")


@pytest.fixture(scope="module", params=STORES)
def server(servers: Callable[[str], Server], request: pytest.FixtureRequest) -> Server:
    """The service on each kind of store: a test that takes it runs once per store,
    unless it is marked ``local_only``."""
    return servers(request.param)


local_only = pytest.mark.parametrize("server", ["local"], indirect=True)
"""For tests of what does not depend on the store: the directory store alone."""


class TrainingNode:
    """What a training node keeps between pushes: the head's reconstruction. It codes
    each archive from the head record the server reports, never touching the store."""

    def __init__(self, server: Server, run: str, token: str = TEAM_A) -> None:
        self.server, self.run, self.token = server, run, token
        self.recon: dict[str, torch.Tensor] | None = None

    def code(self, checkpoint: dict, step: int) -> tuple[bytes, dict]:
        info = self.server.get(f"/v1/runs/{self.run}", self.token).json()
        head = info["head"] and Commit(**{f.name: info["head"][f.name] for f in dataclasses.fields(Commit)})
        out = io.BytesIO()
        _, recon = encode_archive(self.run, CodecParams.from_dict(info["params"]), head,
                                  api.to_bundle(checkpoint), step, out, lambda _: self.recon)
        return out.getvalue(), recon

    def push(self, checkpoint: dict, step: int) -> dict:
        body, recon = self.code(checkpoint, step)
        response = self.server.put_archive(self.run, step, body, self.token)
        assert response.status_code == 201, response.text
        self.recon = recon
        return response.json()


def _assert_bitwise_equal(got: Any, want: Any, where: str = "") -> None:
    """Same structure, same non-tensor values, tensors equal bit for bit (dtype, shape, bytes)."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _assert_bitwise_equal(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_bitwise_equal(g, w, f"{where}/{i}")
    else:
        assert got == want, where


def _check_restore(server: Server, run: str, step: int | str, tmp_path: Path, token: str = TEAM_A) -> dict:
    """GET the checkpoint as a torch file; it must equal a local restore of the same store."""
    response = server.get(f"/v1/runs/{run}/checkpoints/{step}", token)
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    local = tmp_path / f"local-{run}-{step}-{time.monotonic_ns()}.pt"
    api.restore(run, step, local, store=server.store)
    got = torch.load(io.BytesIO(response.content), weights_only=True)
    _assert_bitwise_equal(got, torch.load(local, weights_only=True))
    return got


def _error(response: requests.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def test_health_readiness_and_docs(server: Server) -> None:
    assert requests.get(server.url("/healthz"), timeout=10).json() == {"status": "ok"}
    assert requests.get(server.url("/readyz"), timeout=10).json() == {"status": "ready"}
    assert "swagger" in requests.get(server.url("/docs"), timeout=10).text.lower()
    paths = requests.get(server.url("/openapi.json"), timeout=10).json()["paths"]
    assert {"/v1/runs", "/v1/runs/{run}", "/v1/runs/{run}/checkpoints/{step}",
            ARCHIVE_ROUTE, "/v1/runs/{run}/checkpoints/{step}/raw"} <= set(paths)


def test_a_chain_pushed_over_http_restores_bit_for_bit(server: Server, tiny_run, tmp_path) -> None:
    run = "team-a-chain"
    assert server.create(run, params={"keyframe_every": 3}).status_code == 201
    node, training, bodies = TrainingNode(server, run), tiny_run(), {}
    for step in (10, 20, 30, 40, 50):
        body, recon = node.code(training.advance(10), step)
        bodies[step] = body
        response = server.put_archive(run, step, body)
        assert response.status_code == 201, response.text
        assert response.json()["created"] and response.json()["step"] == step
        node.recon = recon
    commits = api.list_commits(run, server.store)
    assert [c.keyframe for c in commits] == [True, False, False, True, False]

    again = server.put_archive(run, 50, bodies[50])
    assert again.status_code == 200 and again.json()["created"] is False

    first = server.get(f"/v1/runs/{run}/checkpoints", params={"limit": 2}).json()
    second = server.get(f"/v1/runs/{run}/checkpoints", params={"limit": 2, "after": first["next"]}).json()
    last = server.get(f"/v1/runs/{run}/checkpoints", params={"limit": 2, "after": second["next"]}).json()
    pages = [[c["step"] for c in page["checkpoints"]] for page in (first, second, last)]
    assert pages == [[10, 20], [30, 40], [50]] and last["next"] is None

    meta = server.get(f"/v1/runs/{run}/checkpoints/30/meta", READER_A).json()
    assert {k: meta[k] for k in dataclasses.asdict(commits[2])} == dataclasses.asdict(commits[2])
    assert meta["parent"] == 20 and not meta["keyframe"]
    assert meta["ratio"] == pytest.approx(commits[2].ratio, 1e-3)
    info = server.get(f"/v1/runs/{run}", READER_A).json()
    assert info["head"]["step"] == 50 and info["checkpoints"] == 5 and info["keyframes"] == 2
    assert info["stored_bytes"] == sum(c.size for c in commits) and info["ratio"] > 1

    for step in (10, 30, 40, 50):
        assert _check_restore(server, run, step, tmp_path, READER_A)["step"] == step
    assert _check_restore(server, run, "latest", tmp_path)["step"] == 50
    cache_hits = ("excp_restore_seconds_count", (("cache", "hit"), ("format", "torch")))
    hits = server.metrics().get(cache_hits, 0)
    assert _check_restore(server, run, 30, tmp_path)["step"] == 30
    assert server.metrics()[cache_hits] == hits + 1

    archive = server.get(f"/v1/runs/{run}/checkpoints/30/archive")
    assert archive.content == bodies[30] == server.store.get(commits[2].archive)
    assert archive.headers["x-excp-digest"] == commits[2].digest

    tensors = server.get(f"/v1/runs/{run}/checkpoints/40", params={"format": "safetensors"})
    bundle = api.restore(run, 40, store=server.store)
    _assert_bitwise_equal(dict(sorted(load_safetensors(tensors.content).items())),
                          {n: bundle.tensors[n].tensor for n in sorted(bundle.tensors)})
    (tmp_path / "40.safetensors").write_bytes(tensors.content)
    with safe_open(str(tmp_path / "40.safetensors"), "pt") as handle:
        assert handle.metadata()["excp.step"] == "40" and handle.metadata()["excp.layout"] == "torch_dict"
    _error(server.get(f"/v1/runs/{run}/checkpoints/40", params={"format": "tar"}), 400, "invalid_input")
    _error(server.get(f"/v1/runs/{run}/checkpoints/60"), 404, "not_found")



def test_raw_uploads_are_compressed_by_the_server(server: Server, tiny_run, tmp_path) -> None:
    run, training = "team-a-raw", tiny_run(seed=1)
    assert server.create(run, preset="safe").status_code == 201
    for step, parent in ((5, None), (10, 5)):
        path = tmp_path / f"{step}.pt"
        torch.save(training.advance(5), path)
        response = requests.post(server.url(f"/v1/runs/{run}/checkpoints/{step}/raw"), data=path.read_bytes(),
                                 headers=auth(TEAM_A), timeout=120)
        assert response.status_code == 201, response.text
        assert response.json()["parent"] == parent and response.json()["created"]
    again = requests.post(server.url(f"/v1/runs/{run}/checkpoints/10/raw"), data=path.read_bytes(),
                          headers=auth(TEAM_A), timeout=120)
    assert again.status_code == 200 and not again.json()["created"]
    assert _check_restore(server, run, 10, tmp_path)["step"] == 10

    torch.save(training.advance(10), tmp_path / "says-20.pt")  # the dict says step 20
    mislabelled = requests.post(server.url(f"/v1/runs/{run}/checkpoints/15/raw"), headers=auth(TEAM_A),
                                data=(tmp_path / "says-20.pt").read_bytes(), timeout=120)
    assert "says it is step 20" in _error(mislabelled, 400, "invalid_input")
    garbage = requests.post(server.url(f"/v1/runs/{run}/checkpoints/15/raw"), data=b"not a checkpoint",
                            headers=auth(TEAM_A), timeout=120)
    message = _error(garbage, 400, "invalid_input")
    assert "the uploaded file" in message and str(server.root) not in message

    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in training.model.state_dict().items()}, str(weights))
    assert server.create("team-a-st").status_code == 201
    stored = requests.post(server.url("/v1/runs/team-a-st/checkpoints/3/raw"), params={"kind": "safetensors"},
                           data=weights.read_bytes(), headers=auth(TEAM_A), timeout=120)
    assert stored.status_code == 201, stored.text
    back = server.get("/v1/runs/team-a-st/checkpoints/3", params={"format": "safetensors"})
    local = api.restore("team-a-st", 3, tmp_path / "local.safetensors", store=server.store)
    assert back.status_code == 200 and back.content == (tmp_path / "local.safetensors").read_bytes()
    assert set(load_safetensors(back.content)) == set(training.model.state_dict()) == set(local.tensors)


@local_only
def test_a_trainer_directory_comes_back_as_a_tar(server: Server, tmp_path) -> None:
    run = "team-a-hf"
    trainer_dir(tmp_path / "checkpoint-3", tmp_path / "pwned", weights="pytorch_model.bin")
    api.push(tmp_path / "checkpoint-3", run, store=server.store)  # by a CLI on the same store
    response = server.get(f"/v1/runs/{run}/checkpoints/latest", params={"format": "tar"})
    assert response.status_code == 200 and response.headers["x-excp-layout"] == "hf_trainer"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path / "served", filter="data")
    api.restore(run, 3, tmp_path / "local", store=server.store)
    assert files_of(tmp_path / "served" / "checkpoint-3") == files_of(tmp_path / "local")
    assert not (tmp_path / "pwned").exists()  # training_args.bin is never unpickled
    assert "format=tar" in _error(server.get(f"/v1/runs/{run}/checkpoints/3"), 400, "invalid_input")
    tensors = server.get(f"/v1/runs/{run}/checkpoints/3", params={"format": "safetensors"})
    assert tensors.status_code == 200 and len(load_safetensors(tensors.content)) > 0


@local_only
def test_a_run_from_a_seed_needs_an_allowed_factory(server: Server, tmp_path) -> None:
    refused = server.create("team-a-seed-x", base={"seed": 0, "factory": "os:getcwd"})
    assert "--allow-factory os:getcwd" in _error(refused, 400, "invalid_input")
    created = server.create("team-a-seed", base={"seed": 0, "factory": "tests.factories:mlp"})
    assert created.status_code == 201 and created.json()["base"]["factory"] == "tests.factories:mlp"
    assert server.create("team-a-seed", base={"seed": 0, "factory": "tests.factories:mlp"}).status_code == 200
    _error(server.create("team-a-seed", base={"seed": 1, "factory": "tests.factories:mlp"}), 409, "conflict")
    state = {k: v + 0.01 for k, v in mlp(0).state_dict().items()}
    torch.save({"model": state, "step": 7}, tmp_path / "7.pt")
    pushed = requests.post(server.url("/v1/runs/team-a-seed/checkpoints/7/raw"), headers=auth(TEAM_A),
                           data=(tmp_path / "7.pt").read_bytes(), timeout=120)
    assert pushed.status_code == 201 and not pushed.json()["keyframe"]  # a link against the seed's weights
    served = server.get("/v1/runs/team-a-seed/checkpoints/7").content
    base = api.BaseSpec(0, "tests.factories:mlp")
    local = api.restore("team-a-seed", 7, store=server.store, base=base)
    _assert_bitwise_equal(torch.load(io.BytesIO(served), weights_only=True), api.load_dict(local))


def test_racing_writers_get_one_201_and_one_409(server: Server, tiny_run) -> None:
    for run in ("team-a-race", "team-a-race-2"):
        assert server.create(run).status_code == 201
    node, training = TrainingNode(server, "team-a-race"), tiny_run()
    node.push(training.advance(3), 1)
    rival = tiny_run(seed=7)
    mine, _ = node.code(training.advance(3), 2)
    theirs, _ = node.code(rival.advance(6), 2)
    other, _ = TrainingNode(server, "team-a-race-2").code(rival.advance(3), 1)
    barrier = threading.Barrier(3)

    def upload(args: tuple[str, int, bytes]) -> requests.Response:
        barrier.wait(timeout=30)
        return server.put_archive(*args)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(upload, [("team-a-race", 2, mine), ("team-a-race", 2, theirs),
                                         ("team-a-race-2", 1, other)]))
    assert sorted(r.status_code for r in results[:2]) == [201, 409]
    loser = next(r for r in results[:2] if r.status_code == 409)
    assert "already has a different checkpoint at step 2" in _error(loser, 409, "conflict")
    assert results[2].status_code == 201  # another run is not held up by the race
    winner = next(body for body, r in zip((mine, theirs), results[:2], strict=True) if r.status_code == 201)
    assert server.get("/v1/runs/team-a-race/checkpoints/2/archive").content == winner


@local_only
def test_tokens_scopes_and_prefixes(server: Server, tiny_run) -> None:
    assert server.create("team-a-auth").status_code == 201
    assert server.create("team-b-auth", token=TEAM_B).status_code == 201
    node = TrainingNode(server, "team-a-auth")
    node.push(tiny_run().advance(2), 1)

    missing = requests.get(server.url("/v1/runs"), timeout=10)
    assert "needs a token" in _error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    _error(server.get("/v1/runs", token="wrong-token-0123456789"), 401, "unauthorized")
    _error(requests.get(server.url("/v1/runs"), headers={"Authorization": f"Basic {ADMIN}"}, timeout=10),
           401, "unauthorized")
    _error(requests.put(server.url("/v1/runs/team-a-auth/checkpoints/2/archive"), data=b"x", timeout=10),
           401, "unauthorized")

    body, _ = node.code(tiny_run(seed=3).advance(4), 2)
    _error(server.put_archive("team-a-auth", 2, body, token=READER_A), 403, "forbidden")
    _error(server.create("team-a-new", token=READER_A), 403, "forbidden")
    _error(server.create("team-a-new", token=TEAM_B), 403, "forbidden")
    for tail in ("", "/checkpoints", "/checkpoints/1", "/checkpoints/1/archive", "/checkpoints/1/meta"):
        _error(server.get(f"/v1/runs/team-a-auth{tail}", token=TEAM_B), 403, "forbidden")
    _error(server.put_archive("team-a-auth", 2, body, token=TEAM_B), 403, "forbidden")
    _error(server.delete("/v1/runs/team-a-auth/checkpoints/1", token=TEAM_A), 403, "forbidden")
    _error(server.delete("/v1/runs/team-a-auth", token=TEAM_A), 403, "forbidden")

    team_b_sees = server.get("/v1/runs", TEAM_B).json()["runs"]
    team_a_sees = server.get("/v1/runs", READER_A).json()["runs"]
    assert "team-b-auth" in team_b_sees and all(r.startswith("team-b-") for r in team_b_sees)
    assert "team-a-auth" in team_a_sees and all(r.startswith("team-a-") for r in team_a_sees)
    assert set(team_a_sees) | set(team_b_sees) <= set(server.get("/v1/runs").json()["runs"])
    assert server.put_archive("team-a-auth", 2, body).status_code == 201
    assert [c.step for c in api.list_commits("team-a-auth", server.store)] == [1, 2]


def _raw_request(server: Server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """A request whose path goes out exactly as written (requests would normalize dots)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=auth(ADMIN))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@local_only
def test_bad_run_names_and_steps_are_refused(server: Server) -> None:
    assert server.create("team-a-names").status_code in (200, 201)  # the store has a runs/ directory
    outside, store = server.root.parent, server.backend.directory
    assert store is not None
    before = set(os.listdir(outside)), _tree(store)
    for path in ("/v1/runs/%2e%2e", "/v1/runs/..", "/v1/runs/%2E%2E/checkpoints", "/v1/runs/.hidden",
                 "/v1/runs/-x", "/v1/runs/" + "a" * 200, "/v1/runs/team-a-x/checkpoints/-1/meta",
                 "/v1/runs/team-a-x/checkpoints/1e3/meta", "/v1/runs/team-a-x/checkpoints/%2e%2e",
                 "/v1/runs/team-a-x/checkpoints/%201"):
        status, body = _raw_request(server, "GET", path)
        assert status == 400 and body["error"]["code"] == "invalid_input", (path, body)
    for path in ("/v1/runs/a%2Fb", "/v1/runs/..%2F..%2Fetc",
                 "/v1/runs/team-a-x/checkpoints/..%2F..%2F1/meta"):
        status, body = _raw_request(server, "GET", path)
        assert status in (400, 404) and body["error"]["code"] in ("invalid_input", "not_found"), (path, body)
    for path in ("/v1/runs/%2e%2e/checkpoints/1/archive", "/v1/runs/team-a-chain/checkpoints/latest/archive",
                 "/v1/runs/team-a-chain/checkpoints/-5/archive", "/v1/runs/.%2e/checkpoints/1/raw"):
        method = "POST" if path.endswith("/raw") else "PUT"
        status, body = _raw_request(server, method, path, b"\0" * 64)
        assert status == 400 and body["error"]["code"] == "invalid_input", (path, body)
    for name in ("..", "a/b", "../evil", "", ".x", "a" * 129, "x\n", "a b", "%2e%2e"):
        assert server.create(name, token=ADMIN).status_code == 400, name
    assert (set(os.listdir(outside)), _tree(store)) == before
    runs = {p.name for p in (store / "runs").iterdir()}
    assert all(RUN_NAME.fullmatch(r) for r in runs)


@local_only
def test_oversized_bodies_are_413(server: Server) -> None:
    assert server.create("team-a-big").status_code == 201
    declared = server.put_archive("team-a-big", 1, b"\0" * (MAX_BODY + 1))
    assert "limit of 2097152 bytes" in _error(declared, 413, "too_large")

    def chunked() -> Iterator[bytes]:
        for _ in range(MAX_BODY // (256 << 10) + 2):
            yield b"\0" * (256 << 10)

    _error(server.put_archive("team-a-big", 1, chunked()), 413, "too_large")
    _error(requests.post(server.url("/v1/runs"), data=b"{" + b" " * (2 << 20) + b"}",
                         headers={**auth(TEAM_A), "Content-Type": "application/json"}, timeout=30),
           413, "too_large")
    assert server.get("/v1/runs/team-a-big/checkpoints").json()["checkpoints"] == []
    assert server.get("/healthz").status_code == 200


def test_delete_never_breaks_a_restore(server: Server, tiny_run, tmp_path) -> None:
    run = "team-a-del"
    assert server.create(run, params={"keyframe_every": 2}).status_code == 201
    node, training = TrainingNode(server, run), tiny_run(seed=2)
    kinds = [node.push(training.advance(4), step)["keyframe"] for step in (4, 8, 12, 16)]
    assert kinds == [True, False, True, False]
    _error(server.delete(f"/v1/runs/{run}/checkpoints/16", token=TEAM_A), 403, "forbidden")
    refused = server.delete(f"/v1/runs/{run}/checkpoints/12")
    assert "needed to restore steps 16" in _error(refused, 409, "conflict")
    refused = server.delete(f"/v1/runs/{run}/checkpoints/4")
    assert "needed to restore steps 8" in _error(refused, 409, "conflict")
    assert server.delete(f"/v1/runs/{run}/checkpoints/16").status_code == 204  # the head
    assert server.delete(f"/v1/runs/{run}/checkpoints/8").status_code == 204  # its next is a keyframe
    _error(server.delete(f"/v1/runs/{run}/checkpoints/8"), 404, "not_found")
    steps = [c["step"] for c in server.get(f"/v1/runs/{run}/checkpoints").json()["checkpoints"]]
    assert steps == [4, 12] and len(server.store.list(f"runs/{run}/archives/")) == 2
    for step in (4, 12):
        assert _check_restore(server, run, step, tmp_path)["step"] == step
    assert _check_restore(server, run, "latest", tmp_path)["step"] == 12

    assert server.delete(f"/v1/runs/{run}").status_code == 204
    _error(server.get(f"/v1/runs/{run}"), 404, "not_found")
    assert server.store.list(f"runs/{run}/") == [] and run not in api.list_runs(server.store)
    if server.backend.directory is not None:
        assert not (server.backend.directory / "runs" / run).exists()
    assert run not in server.get("/v1/runs").json()["runs"]


@local_only
def test_metrics_move_with_requests(server: Server, tiny_run) -> None:
    run = "team-a-metrics"
    assert server.create(run).status_code == 201
    before = server.metrics()
    TrainingNode(server, run).push(tiny_run().advance(2), 1)
    restored = server.get(f"/v1/runs/{run}/checkpoints/1")
    assert restored.status_code == 200
    route = "/v1/runs/{run}/checkpoints/{step}"
    get_key = ("excp_http_requests_total", (("method", "GET"), ("route", route), ("status", "200")))
    deadline = time.monotonic() + 10
    # a request is counted once its response has gone out, which can be just after the
    # client has read it: poll until it shows
    while (after := server.metrics()).get(get_key, 0.0) == before.get(get_key, 0.0):
        assert time.monotonic() < deadline, "the restore never showed in /metrics"
        time.sleep(0.05)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("excp_http_requests_total", method="GET", route=route, status="200") == 1
    assert grew("excp_http_requests_total", method="PUT", route=ARCHIVE_ROUTE, status="201") == 1
    assert grew("excp_http_request_bytes_total", route=ARCHIVE_ROUTE) > 0
    assert grew("excp_http_response_bytes_total", route=route) >= len(restored.content)
    assert grew("excp_restore_seconds_count", format="torch", cache="miss") == 1
    assert grew("excp_commit_ratio_count", source="archive") == 1
    assert after[("excp_restore_cache_bytes", ())] <= 1 << 20


def _big_checkpoint(seed: int, step: int) -> dict:
    """A bare state dict of 1M float32 weights (4 MB): an upload worth interrupting."""
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1024, 1024, generator=gen), "b": torch.randn(1024, generator=gen)}


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: Linux, like the service's tests)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("kind", STORES)
def test_a_server_killed_mid_upload_commits_nothing(kind: str, tmp_path, request) -> None:
    backend, run = new_backend(kind, tmp_path, request), "team-a-kill"
    store, recon = backend.store, None
    for step in (1, 2):  # lossless, so the upload stays about as large as the checkpoint
        _, recon = api.push(_big_checkpoint(step, step), run, step=step, store=store,
                            params=PRESETS["lossless"])
    chain = Chain(store, run)
    body = io.BytesIO()
    encode_archive(run, chain.params(), chain.head(), api.to_bundle(_big_checkpoint(3, 3)), 3, body,
                   lambda _: recon)
    body = body.getvalue()
    half = len(body) // 2
    assert half > 1 << 20
    server = Server(tmp_path, backend, max_body=64 << 20).start()
    try:
        assert server.get(f"/v1/runs/{run}/checkpoints/1").status_code == 200  # starts a worker process
        workers = _children(server.proc.pid)
        assert workers
        released, outcome = threading.Event(), {}

        def slowly() -> Iterator[bytes]:
            for start in range(0, half, 64 << 10):
                yield body[start:min(start + (64 << 10), half)]
            released.wait(timeout=60)
            yield body[half:]

        def upload() -> None:
            try:
                outcome["response"] = server.put_archive(run, 3, slowly())
            except requests.RequestException as exc:
                outcome["error"] = exc

        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + DEADLINE
        while server.metrics().get(("excp_http_request_bytes_total", (("route", ARCHIVE_ROUTE),)), 0) < half:
            assert time.monotonic() < deadline, "the server never received the first half of the upload"
            time.sleep(0.05)
        assert server.metrics()[("excp_http_requests_in_flight", (("method", "PUT"),))] == 1
        server.kill()
        released.set()
        uploader.join(timeout=60)
        assert "error" in outcome and "response" not in outcome
        while any(Path(f"/proc/{pid}").exists() for pid in workers):  # they exit with the server
            assert time.monotonic() < deadline, "worker processes outlived the killed server"
            time.sleep(0.1)

        assert [c.step for c in chain.commits()] == [1, 2]
        keys = store.list(f"runs/{run}/")
        assert not any(re.search(r"/0*3(-|\.json)", key) for key in keys), keys
        if backend.bucket is not None:  # nor a multipart upload left behind
            uploads = admin(backend.endpoint).list_multipart_uploads(Bucket=backend.bucket)
            assert not uploads.get("Uploads"), uploads

        server.start()
        assert len(list((tmp_path / "cache" / "spool").iterdir())) == 1  # the killed server's is swept
        steps = [c["step"] for c in server.get(f"/v1/runs/{run}/checkpoints").json()["checkpoints"]]
        assert steps == [1, 2]
        _error(server.get(f"/v1/runs/{run}/checkpoints/3/meta"), 404, "not_found")
        for step in (1, 2):
            got = server.get(f"/v1/runs/{run}/checkpoints/{step}")
            api.restore(run, step, tmp_path / f"{step}.pt", store=store)
            _assert_bitwise_equal(torch.load(io.BytesIO(got.content), weights_only=True),
                                  torch.load(tmp_path / f"{step}.pt", weights_only=True))
        assert server.put_archive(run, 3, body).status_code == 201  # the step was never taken
        assert [c.step for c in chain.commits()] == [1, 2, 3]
    finally:
        server.stop()
        if backend.bucket is not None:
            moto_api(backend.endpoint, "reset")  # 12 MB of archives


def test_serve_refuses_a_public_host_without_tokens(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EXCP_TOKENS", "EXCP_STORE")}
    done = subprocess.run([sys.executable, "-c", "from excp.cli import main; main()", "serve", "--host",
                           "0.0.0.0", "--port", str(free_port()), "--store", str(tmp_path / "s")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "excp: error [invalid_input]: refusing to serve on 0.0.0.0 without tokens: pass --tokens FILE or "
        "set EXCP_TOKENS (anonymous access is only the default on a loopback host)"]
    assert not (tmp_path / "s").exists()
