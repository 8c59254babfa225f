"""The service under hostile or careless clients, against a real ``excp serve``.

schemathesis fuzzes every operation of the server's own OpenAPI (with a token, without
one, and pinned to a run that exists) and no answer may be a 5xx or break the schema; a
scope × prefix matrix checks every operation for every kind of token; hostile run names,
oversized bodies and headers, and slow clients are all answered 4xx (or cut off) with
nothing stored; and no token, right or wrong, ever reaches the server's log.

One server serves the module, with ``--client-timeout 2`` so that slow clients are cut
off quickly. ``EXCP_SCHEMATHESIS_EXAMPLES`` sets the examples per fuzzed variant (CI
default 8; a campaign: ``EXCP_SCHEMATHESIS_EXAMPLES=500 pytest -s -k schemathesis
tests/test_api_security.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from excp import api
from excp.chain import RUN_NAME
from excp.codec.params import PRESETS
from excp.errors import InvalidInput
from server.config import ServeConfig
from tests.conftest import TinyRun
from tests.serve_fixtures import ADMIN, MAX_BODY, READER_A, TEAM_A, TEAM_B, TOKENS, Server, auth, new_backend
from tests.test_server import (
    TrainingNode,
    _one_torch_thread,  # noqa: F401 (an autouse fixture)
)

CLIENT_TIMEOUT = 2
CUT_OFF_WITHIN = 30.0
"""How long a test waits for the server to cut a slow client off: a bound, not a measure."""
EXAMPLES = int(os.environ.get("EXCP_SCHEMATHESIS_EXAMPLES", "8"))

COVERING, MISSING = "mx-", "mx-other-"
"""A prefix that covers every matrix run, and one that covers none of them (a longer
prefix with the same start, so a sloppy prefix test would let it through)."""
SCOPES = ("read", "write", "admin")
IMPLIED = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
MATRIX = {f"{scope}-{where}": (scope, prefix, f"matrix-{scope}-{where}-0123456789abcdef")
          for scope in SCOPES for where, prefix in (("in", COVERING), ("out", MISSING))}
SECURITY_TOKENS = {"tokens": TOKENS["tokens"] + [
    {"name": name, "token": token, "scopes": [scope], "prefixes": [prefix]}
    for name, (scope, prefix, token) in MATRIX.items()]}
WRONG_TOKENS = ("wrong-token-0123456789abcdef", ADMIN[:-1] + "X", "x" * 300, TEAM_A.upper())
"""Tokens no one configured, sent in tests below: none may reach the log either."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("security")
    running = Server(root, new_backend("local", root, request), tokens=SECURITY_TOKENS,
                     extra_args=("--client-timeout", str(CLIENT_TIMEOUT))).start()
    yield running
    running.stop()


def _store_tree(server: Server) -> dict[str, str]:
    """Every file of the store with a digest of its content."""
    root = server.backend.directory
    assert root is not None
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _spooled(server: Server) -> list[Path]:
    """Uploads in flight (or left behind) in the server's spool."""
    return [p for p in (server.root / "cache" / "spool").rglob("*") if p.is_file()]


# --- raw HTTP: requests would normalize paths and refuse control bytes -----------------

def _request(method: str, target: bytes, token: str | None = ADMIN, body: bytes = b"",
             headers: tuple[bytes, ...] = ()) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode(), *headers]
    if token is not None:
        lines.append(b"Authorization: Bearer " + token.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=CUT_OFF_WITHIN)


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, data: bytes) -> Answer:
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
        return cls(int(status_line.split()[1]), headers, body)

    def error_code(self) -> str:
        """The code of a 4xx in the API's JSON error shape (asserting that shape)."""
        assert 400 <= self.status < 500, (self.status, self.body[:300])
        assert self.headers.get("content-type") == "application/json", self.headers
        error = json.loads(self.body)["error"]
        assert set(error) == {"code", "message"} and error["message"], error
        return error["code"]


def _exchange(server: Server, request: bytes) -> Answer:
    with _connect(server) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the whole request was sent: read what came
        return Answer.parse(_until_closed(sock))


# --- schemathesis over the server's own OpenAPI -----------------------------------------

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance)
FUZZ_RUN = "team-a-fuzz"


@dataclass
class Campaign:
    """What the fuzzing saw: statuses answered, and the first failure of each kind."""

    session: requests.Session
    statuses: Counter[int]
    failures: dict[str, str]

    def fuzz(self, operation: APIOperation, mode: GenerationMode, headers: dict[str, str],
             path_parameters: dict[str, str] | None) -> None:
        """EXAMPLES cases of ``operation``; failures are collected, not raised, so that
        one run reports them all (and hypothesis does not shrink)."""

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def run(case: schemathesis.Case) -> None:
            response = case.call(session=self.session, headers=headers, timeout=120)
            self.statuses[response.status_code] += 1
            for check in CHECKS:
                try:
                    case.validate_response(response, checks=[check])
                except AssertionError as failure:
                    where = f"{operation.label} {mode.value} {check.__name__} {response.status_code}"
                    self.failures.setdefault(where, f"{case.path_parameters} {case.query} "
                                                    f"{response.text[:300]}: {failure}"[:2000])

        run()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Server) -> None:
    """Every operation, in positive and negative mode, with the admin token and without
    one, and pinned to a run that has a checkpoint (deletes left out there: they would
    remove what the other variants need)."""
    assert server.create(FUZZ_RUN).status_code in (200, 201)
    TrainingNode(server, FUZZ_RUN).push(TinyRun(seed=5).advance(1), 1)
    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    operations = [result.ok() for result in schema.get_all_operations()]
    document = requests.get(server.url("/openapi.json"), timeout=30).json()["paths"]
    assert {op.label for op in operations} == {f"{m.upper()} {p}" for p, ms in document.items() for m in ms}
    unsatisfiable = []
    with requests.Session() as session:
        campaign = Campaign(session, Counter(), {})
        for operation in operations:
            pinned = {k: v for k, v in (("run", FUZZ_RUN), ("step", "1")) if f"{{{k}}}" in operation.path}
            variants = [(mode, headers, None) for mode in GenerationMode for headers in (auth(ADMIN), {})]
            if pinned and operation.method.upper() != "DELETE":
                variants += [(mode, auth(ADMIN), pinned) for mode in GenerationMode]
            for mode, headers, path_parameters in variants:
                try:
                    campaign.fuzz(operation, mode, headers, path_parameters)
                except Unsatisfiable:  # nothing to negate: an operation without parameters
                    unsatisfiable.append(f"{operation.label} {mode.value}")
    statuses = campaign.statuses
    print(f"schemathesis: {sum(statuses.values())} requests over {len(operations)} operations, "
          f"{EXAMPLES} examples per variant; statuses {dict(sorted(statuses.items()))}; "
          f"no negative cases for {sorted(set(unsatisfiable))}")
    assert not campaign.failures, "\n".join(f"{k}: {v}" for k, v in campaign.failures.items())
    assert not [s for s in statuses if s >= 500]
    assert {s for s in statuses if s < 300} and {400, 401, 404} <= set(statuses)  # it reached the routes


# --- every operation × every kind of token ----------------------------------------------

@dataclass(frozen=True)
class Operation:
    """One API operation as the matrix drives it: the scope it needs (None: any token),
    its success status, the state its run needs ("shared": the shared run with step 1;
    "absent", "empty", "one": a run of the cell's own), and the request."""

    name: str
    scope: str | None
    ok: int
    state: str
    call: Callable[[Server, str, str | None, dict[str, bytes]], requests.Response]


def _send(server: Server, method: str, path: str, token: str | None, **kwargs: Any) -> requests.Response:
    headers = auth(token) if token is not None else {}
    return requests.request(method, server.url(path), headers=headers, timeout=120, **kwargs)


SHARED = "mx-shared"
OPERATIONS = [
    Operation("list-runs", None, 200, "shared",
              lambda s, run, t, _: _send(s, "GET", "/v1/runs?limit=1000", t)),
    Operation("get-run", "read", 200, "shared", lambda s, run, t, _: _send(s, "GET", f"/v1/runs/{run}", t)),
    Operation("create-run", "write", 201, "absent",
              lambda s, run, t, _: _send(s, "POST", "/v1/runs", t, json={"name": run})),
    Operation("delete-run", "admin", 204, "empty",
              lambda s, run, t, _: _send(s, "DELETE", f"/v1/runs/{run}", t)),
    Operation("list-checkpoints", "read", 200, "shared",
              lambda s, run, t, _: _send(s, "GET", f"/v1/runs/{run}/checkpoints", t)),
    Operation("meta", "read", 200, "shared",
              lambda s, run, t, _: _send(s, "GET", f"/v1/runs/{run}/checkpoints/1/meta", t)),
    Operation("upload-archive", "write", 201, "empty",
              lambda s, run, t, b: _send(s, "PUT", f"/v1/runs/{run}/checkpoints/1/archive", t, data=b[run])),
    Operation("upload-raw", "write", 201, "empty",
              lambda s, run, t, b: _send(s, "POST", f"/v1/runs/{run}/checkpoints/1/raw", t, data=b["raw"])),
    Operation("restore", "read", 200, "shared",
              lambda s, run, t, _: _send(s, "GET", f"/v1/runs/{run}/checkpoints/1", t)),
    Operation("download-archive", "read", 200, "shared",
              lambda s, run, t, _: _send(s, "GET", f"/v1/runs/{run}/checkpoints/1/archive", t)),
    Operation("delete-checkpoint", "admin", 204, "one",
              lambda s, run, t, _: _send(s, "DELETE", f"/v1/runs/{run}/checkpoints/1", t)),
]
PRINCIPALS: dict[str, tuple[str, str, str] | None] = {**MATRIX, "anonymous": None}


def _expected(principal: tuple[str, str, str] | None, operation: Operation, run: str) -> int:
    """The status the scope rules give: 401 without a token (no anonymous grant here),
    success where the token's scope implies the one needed over a prefix of the run, else 403."""
    if principal is None:
        return 401
    scope, prefix, _ = principal
    if operation.scope is None or (operation.scope in IMPLIED[scope] and run.startswith(prefix)):
        return operation.ok
    return 403


def _prepare(server: Server, operation: Operation, run: str, bodies: dict[str, bytes]) -> None:
    if operation.state in ("empty", "one"):
        assert server.create(run, token=ADMIN).status_code == 201
    if operation.state == "one":
        api.push(TinyRun(seed=1).advance(1), run, step=1, store=server.store)
    if operation.name == "upload-archive":
        bodies[run], _ = TrainingNode(server, run, ADMIN).code(TinyRun(seed=2).advance(1), 1)


def _effect_holds(server: Server, operation: Operation, run: str, response: requests.Response,
                  principal: tuple[str, str, str]) -> bool:
    """What an allowed operation must have done (or shown) beyond its status."""
    runs = api.list_runs(server.store)
    commits = api.list_commits(run, server.store) if run in runs else None
    steps = None if commits is None else [c.step for c in commits]
    scope, prefix, _ = principal
    return {
        "list-runs": lambda: (SHARED in response.json()["runs"]) == ("read" in IMPLIED[scope]
                                                                       and SHARED.startswith(prefix)),
        "get-run": lambda: response.json()["name"] == run and response.json()["checkpoints"] == 1,
        "create-run": lambda: steps == [],
        "delete-run": lambda: steps is None,
        "list-checkpoints": lambda: [c["step"] for c in response.json()["checkpoints"]] == [1],
        "meta": lambda: response.json()["step"] == 1,
        "upload-archive": lambda: steps == [1],
        "upload-raw": lambda: steps == [1],
        "restore": lambda: torch.load(io.BytesIO(response.content), weights_only=True)["step"] == 1,
        "download-archive": lambda: response.content == server.store.get(commits[0].archive),
        "delete-checkpoint": lambda: steps == [],
    }[operation.name]()


def test_every_operation_for_every_scope_and_prefix(server: Server) -> None:
    """7 principals (read, write, admin over a covering and a non-covering prefix, and no
    token) × 11 operations, every cell checked: the status the scope rules give, the
    effect of an allowed call, and an unchanged store after a denied one."""
    assert server.create(SHARED, token=ADMIN).status_code == 201
    api.push(TinyRun(seed=3).advance(1), SHARED, step=1, store=server.store)
    raw = io.BytesIO()
    torch.save(TinyRun(seed=4).advance(1), raw)
    bodies = {"raw": raw.getvalue()}
    cells: dict[tuple[str, str], str] = {}
    for operation in OPERATIONS:
        for name, principal in PRINCIPALS.items():
            run = SHARED if operation.state == "shared" else f"{COVERING}{operation.name}-{name}"
            _prepare(server, operation, run, bodies)
            before = _store_tree(server)
            response = operation.call(server, run, principal and principal[2], bodies)
            want = _expected(principal, operation, run)
            if response.status_code != want:
                outcome = f"got {response.status_code}, want {want}: {response.text[:200]}"
            elif want >= 400:
                code = {401: "unauthorized", 403: "forbidden"}[want]
                held = response.json()["error"]["code"] == code and _store_tree(server) == before
                outcome = "ok" if held else "denied, but the store changed"
            else:
                held = _effect_holds(server, operation, run, response, principal)
                outcome = "ok" if held else "allowed, but without its effect"
            cells[(operation.name, name)] = outcome
    assert len(cells) == len(OPERATIONS) * len(PRINCIPALS) == 77
    wrong = {cell: outcome for cell, outcome in cells.items() if outcome != "ok"}
    assert not wrong, wrong
    allowed = sum(_expected(p, o, COVERING) < 400 for o in OPERATIONS for p in PRINCIPALS.values())
    assert allowed == 5 * 3 + 3 * 2 + 2 * 1 + 6  # reads, writes, deletes; list-runs by any token


# --- hostile run names --------------------------------------------------------------------

HOSTILE_NAMES = [
    "..", "../x", "a/b", "%2F", "a%2Fb", "..%2F..%2Fetc",
    "team\u2010a-x",  # U+2010 HYPHEN for '-'
    "t\u0435am-a-x",  # Cyrillic е
    "\uff54\uff45\uff41\uff4d-a-x",  # full-width 'team'
    "team-a-\u202ex",  # RIGHT-TO-LEFT OVERRIDE
    "team-a\u200d-x",  # ZERO WIDTH JOINER
    "team-a-x\u0301",  # a combining accent
    "a\x00b", "%00", "team-a-\x00", "a" * 10_000, "", " ", "team-a-x ", "\tteam-a-x", "team-a-x\r\n",
    ".", ".hidden", "-x",
]
"""Names no run may have; each is also tried as the name of a write to the team-a- prefix."""


def _targets(name: str) -> list[bytes]:
    """The name as one percent-encoded path segment, and as raw bytes where it is not
    empty (control and non-ASCII bytes are then refused by the HTTP parser itself)."""
    return [quote(name, safe="").encode()] + ([name.encode()] if name else [])


def test_hostile_run_names_are_refused_and_touch_nothing(server: Server) -> None:
    assert server.create("team-a-names", token=ADMIN).status_code in (200, 201)
    outside = server.root.parent
    before = set(os.listdir(outside)), _store_tree(server)
    tried: Counter[str] = Counter()
    for name in HOSTILE_NAMES:
        created = requests.post(server.url("/v1/runs"), json={"name": name}, headers=auth(TEAM_A), timeout=30)
        assert created.status_code == 400 and created.json()["error"]["code"] == "invalid_input", name
        tried["create"] += 1
        for segment in _targets(name):
            for method, tail, body in (("GET", b"", b""), ("GET", b"/checkpoints/1", b""),
                                       ("PUT", b"/checkpoints/1/archive", b"\0" * 64),
                                       ("POST", b"/checkpoints/1/raw", b"\0" * 64)):
                for token in (ADMIN, TEAM_A):
                    answer = _exchange(server, _request(method, b"/v1/runs/" + segment + tail, token, body))
                    assert answer.error_code() in ("invalid_input", "not_found"), (name, method, tail, answer)
                    tried[method + tail.decode()] += 1
    # a look-alike of a prefix never gets its grant, a valid name outside it gets a 403
    assert requests.post(server.url("/v1/runs"), json={"name": "TEAM-A-x"}, headers=auth(TEAM_A),
                         timeout=30).json()["error"]["code"] == "forbidden"
    assert (set(os.listdir(outside)), _store_tree(server)) == before
    assert all(RUN_NAME.fullmatch(run) for run in api.list_runs(server.store))
    print(f"hostile names: {len(HOSTILE_NAMES)} names, {sum(tried.values())} requests {dict(tried)}")


# --- oversized bodies and headers ---------------------------------------------------------

def test_oversized_bodies_and_headers_are_refused(server: Server) -> None:
    run = "team-a-huge"
    assert server.create(run).status_code == 201
    before = _store_tree(server)
    archive = f"/v1/runs/{run}/checkpoints/1/archive".encode()
    declared = _request("PUT", archive, TEAM_A).replace(b"Content-Length: 0",
                                                        f"Content-Length: {MAX_BODY + 1}".encode())
    assert _exchange(server, declared).error_code() == "too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // (256 << 10) + 2):
            yield b"\0" * (256 << 10)

    chunked = requests.put(server.url(archive.decode()), data=chunks(), headers=auth(TEAM_A), timeout=60)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "too_large"
    raw = requests.post(server.url(f"/v1/runs/{run}/checkpoints/1/raw"), data=chunks(), headers=auth(TEAM_A),
                        timeout=60)
    assert raw.status_code == 413 and raw.json()["error"]["code"] == "too_large"
    padded = json.dumps({"name": "team-a-j", "pad": "x" * (2 << 20)})
    big_json = requests.post(server.url("/v1/runs"), data=padded,
                             headers={**auth(TEAM_A), "Content-Type": "application/json"}, timeout=60)
    assert big_json.status_code == 413 and big_json.json()["error"]["code"] == "too_large"

    huge_token = _request("GET", b"/v1/runs", "t" * 100_000)
    many = _request("GET", b"/v1/runs", ADMIN, headers=tuple(f"X-Pad-{i}: {'p' * 100}".encode()
                                                              for i in range(1000)))
    long_target = _request("GET", b"/v1/runs?after=" + b"a" * 100_000, ADMIN)
    for request in (huge_token, many, long_target):  # 431, or 400 where h11 saw them arrive in pieces
        answer = _exchange(server, request)
        assert (answer.status, answer.error_code()) in ((431, "too_large"), (400, "invalid_input")), answer
    assert _store_tree(server) == before and not _spooled(server)
    assert server.get("/healthz").status_code == 200
    assert server.get(f"/v1/runs/{run}", TEAM_A).json()["checkpoints"] == 0


# --- slow clients -------------------------------------------------------------------------

def _trickle(sock: socket.socket, data: bytes, every: float) -> int:
    """Send ``data`` a byte every ``every`` seconds until the server says or closes
    something; the bytes sent."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent:sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        if select.select([sock], [], [], every)[0]:
            return sent + 1
    return len(data)


def _upload_head(run: str, kind: str, length: int) -> bytes:
    route = {"archive": ("PUT", "archive"), "raw": ("POST", "raw")}[kind]
    request = _request(route[0], f"/v1/runs/{run}/checkpoints/1/{route[1]}".encode(), TEAM_A)
    return request.replace(b"Content-Length: 0", f"Content-Length: {length}".encode())


def test_a_client_trickling_headers_is_cut_off(server: Server) -> None:
    headers = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: " + b"x" * 100
    with _connect(server) as sock:
        sent = _trickle(sock, headers, every=1.0)
        assert sent < len(headers)  # the server closed before the headers could end
        assert _until_closed(sock) == b""  # closed without an answer
    with _connect(server) as idle:  # a client that connects and sends nothing
        assert _until_closed(idle) == b""
    assert server.get("/healthz").status_code == 200


@pytest.mark.parametrize("kind", ["archive", "raw"])
@pytest.mark.parametrize("pace", ["stalls", "trickles"])
def test_a_slow_body_is_408_and_commits_nothing(server: Server, kind: str, pace: str) -> None:
    run = f"team-a-slow-{kind}-{pace}"
    assert server.create(run).status_code == 201
    before = _store_tree(server)
    with _connect(server) as sock:
        sock.sendall(_upload_head(run, kind, 100_000))
        if pace == "stalls":
            sock.sendall(b"\0" * 100)
        else:
            assert _trickle(sock, b"\0" * 100_000, every=0.25) < 100_000
        answer = Answer.parse(_until_closed(sock))  # and the server closed the connection
    assert answer.error_code() == "request_timeout" and answer.headers["connection"] == "close"
    assert _store_tree(server) == before and not _spooled(server)
    TrainingNode(server, run).push(TinyRun(seed=6).advance(1), 1)  # a normal upload right after
    assert [c.step for c in api.list_commits(run, server.store)] == [1]


def test_twenty_slow_clients_do_not_hold_up_others(server: Server) -> None:
    run = "team-a-crowd"
    assert server.create(run).status_code == 201
    before = _store_tree(server)
    idle = [_connect(server) for _ in range(5)]
    partial = [_connect(server) for _ in range(5)]
    bodies = [_connect(server) for _ in range(10)]
    for sock in partial:
        sock.sendall(b"GET /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ")
    for i, sock in enumerate(bodies):
        sock.sendall(_upload_head(run, ("archive", "raw")[i % 2], 100_000) + b"\0" * 10)
    try:
        assert server.get("/v1/runs", READER_A).status_code == 200  # answered while 20 are slow
        assert server.get("/healthz").status_code == 200
        for sock in idle + partial:
            assert _until_closed(sock) == b""
        for sock in bodies:
            assert Answer.parse(_until_closed(sock)).error_code() == "request_timeout"
    finally:
        for sock in idle + partial + bodies:
            sock.close()
    assert _store_tree(server) == before and not _spooled(server)
    assert server.get(f"/v1/runs/{run}", TEAM_A).json()["checkpoints"] == 0


def test_a_client_that_stops_reading_is_dropped(server: Server) -> None:
    """A download the client stops reading fills the socket and the server's buffer; the
    server drops the connection after --client-timeout instead of holding the answer
    (and the file behind it) for ever."""
    run = "team-a-unread"
    noise = torch.randn(4 << 20, generator=torch.Generator().manual_seed(9))  # 16 MB, incompressible
    api.push({"w": noise}, run, step=1, store=server.store, params=PRESETS["lossless"])
    size = api.list_commits(run, server.store)[0].size
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(CUT_OFF_WITHIN)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(_request("GET", f"/v1/runs/{run}/checkpoints/1/archive".encode(), READER_A))
        time.sleep(3 * CLIENT_TIMEOUT)  # reads nothing meanwhile
        received = len(_until_closed(sock))
    assert received < size, "the whole answer was delivered to a client that read nothing for 6 s"
    assert "read nothing of the answer" in server.output()
    assert server.get("/healthz").status_code == 200
    whole = server.get(f"/v1/runs/{run}/checkpoints/1/archive", READER_A)  # a reader that reads
    assert whole.status_code == 200 and len(whole.content) == size


def test_client_timeout_must_be_positive(tmp_path: Path) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidInput, match="--client-timeout must be more than 0 seconds"):
            ServeConfig(store=str(tmp_path), client_timeout=bad)


# --- tokens never logged (last: the log then holds everything the module did) ------------

def test_tokens_never_reach_the_log(server: Server) -> None:
    for wrong in WRONG_TOKENS:
        answer = requests.get(server.url("/v1/runs"), headers=auth(wrong), timeout=30)
        assert answer.status_code == 401 and wrong not in answer.text
        assert requests.get(server.url("/v1/runs"), headers={"Authorization": f"Basic {wrong}"},
                            timeout=30).status_code == 401
    for token in (ADMIN, WRONG_TOKENS[0]):  # a token where the API never takes one
        for name in ("access_token", "token"):
            assert requests.get(server.url(f"/v1/runs?{name}={token}"), timeout=30).status_code == 401
    assert server.get(f"/v1/runs/team-b-x?token={TEAM_B}", TEAM_B).status_code == 404
    with _connect(server) as sock:  # a slow client with a token, cut off
        sock.sendall(_upload_head("team-a-crowd", "archive", 1000))
        assert Answer.parse(_until_closed(sock)).status == 408
    with _connect(server) as sock:
        sock.sendall(b"GET /v1/runs HTTP/1.1\r\nAuthorization: Bearer " + WRONG_TOKENS[1].encode())
        assert _until_closed(sock) == b""
    log = (server.root / f"server-{server.port}.log").read_text(errors="replace")
    assert '"GET /v1/runs HTTP/1.1" 401' in log
    assert "closed a connection from" in log and "408 Request Timeout" in log
    secrets = [t["token"] for t in SECURITY_TOKENS["tokens"]] + list(WRONG_TOKENS)
    leaked = [secret[:12] + "…" for secret in secrets if secret in log]
    assert not leaked, f"tokens in the server log: {leaked}"
