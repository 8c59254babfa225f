"""Storage faults between the S3 store and moto's S3 server (``tests/fault_proxy.py``).

Every kind of fault, on every store operation, is survived by retries and leaves the
data read back equal to what was written. Under a random plan of faults, pushes
through ``excp.api`` commit whole or not at all and restores are exact or refused.
The service answers 503 ``store_unavailable`` while its store is down and recovers on
its own, and a client pushing through such an outage gets there by its retries.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
import requests
import torch
from botocore.exceptions import ClientError
from botocore.retries.standard import ExponentialBackoff

from excp import api
from excp.chain import Chain
from excp.client import Client
from excp.client.target import ServiceTarget
from excp.errors import ExcpError, NotFound
from excp.store import Store
from excp.store.s3 import _BODY_BACKOFF, MIN_PART_SIZE, S3Store
from tests.conftest import TinyRun
from tests.fault_proxy import BODY_KINDS, KINDS, FaultProxy, coded_archive, proxied_backend
from tests.s3_fixtures import AWS_SETTINGS, REGION, moto_api, moto_endpoint, moto_settings, new_bucket
from tests.serve_fixtures import ADMIN, TEAM_A, Server

__all__ = ["moto_endpoint"]  # the fixture

SMALL = random.Random(1).randbytes(3000)
LARGE = random.Random(2).randbytes(9 << 20)  # above the 8 MiB that open_read keeps in memory
MULTI = random.Random(3).randbytes(2 * MIN_PART_SIZE + 4321)  # three parts


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenth of botocore's and the store's waits between retries, so a hundred injected
    faults fit in the suite's time; what is retried and how often is unchanged (the
    campaign, benchmarks/faults.py, keeps the real waits). The service's own store, in
    its subprocess, keeps them too."""
    delay = ExponentialBackoff.delay_amount
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: delay(self, context) / 10)
    monkeypatch.setattr("excp.store.s3._BODY_BACKOFF", _BODY_BACKOFF / 10)


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One bucket for the module's store tests, each under a prefix of its own (a bucket
    per test costs more than most of these tests), with the AWS settings sent to moto."""
    with pytest.MonkeyPatch.context() as patch:
        for name in AWS_SETTINGS:
            patch.delenv(name, raising=False)
        for name, value in moto_settings(moto_endpoint, tmp_path_factory.mktemp("aws")).items():
            patch.setenv(name, value)
        yield new_bucket(moto_endpoint)
    moto_api(moto_endpoint, "reset")


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint, stall=0.8) as running:
        yield running


def stores(bucket: str, prefix: str, proxy: FaultProxy, max_attempts: int = 5) -> tuple[S3Store, S3Store]:
    """The store under test, reaching moto through ``proxy`` with a read timeout below
    the proxy's stalls, and the same store reached directly, to set up and check."""
    faulty = S3Store(bucket, prefix, endpoint_url=proxy.url, connect_timeout=1, read_timeout=0.3,
                     max_attempts=max_attempts, multipart_threshold=MIN_PART_SIZE,
                     multipart_chunksize=MIN_PART_SIZE)
    return faulty, S3Store(bucket, prefix, endpoint_url=proxy.upstream_url)


def test_requests_through_the_proxy_keep_their_signatures(bucket: str, moto_endpoint: str,
                                                          proxy: FaultProxy) -> None:
    """With moto checking SigV4, a request signed with the right secret passes the proxy
    (it forwards the client's Host header and signed headers unchanged) and one signed
    with a wrong secret is refused, as without the proxy."""
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name=REGION)
    iam.create_user(UserName="fault-proxy")
    iam.put_user_policy(UserName="fault-proxy", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="fault-proxy")["AccessKey"]

    def client(secret: str) -> Any:
        return boto3.client("s3", endpoint_url=proxy.url, region_name=REGION,
                            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=secret)

    moto_api(moto_endpoint, "reset-auth", b"0")  # from now on moto checks every signature
    try:
        signed = client(key["SecretAccessKey"])
        signed.put_object(Bucket=bucket, Key="signed/k", Body=SMALL)
        assert signed.get_object(Bucket=bucket, Key="signed/k")["Body"].read() == SMALL
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            client("not-the-secret").get_object(Bucket=bucket, Key="signed/k")
    finally:
        moto_api(moto_endpoint, "reset-auth", b"inf")
    assert proxy.counts()["forwarded"] == 3


# --- every fault kind on every operation ---------------------------------------------

def _get(store: S3Store, clean: Store) -> None:
    clean.put("obj/small", SMALL)
    assert store.get("obj/small") == SMALL


def _get_missing(store: S3Store, clean: Store) -> None:
    """The answer is moto's 404 with an XML body, which the faults spoil instead."""
    with pytest.raises(NotFound):
        store.get("obj/missing")


def _open_read_small(store: S3Store, clean: Store) -> None:
    clean.put("obj/small", SMALL)
    with store.open_read("obj/small") as stream:
        assert stream.read() == SMALL


def _open_read_large(store: S3Store, clean: Store) -> None:
    clean.put("obj/large", LARGE)
    with store.open_read("obj/large") as stream:
        assert stream.read() == LARGE


def _put(store: S3Store, clean: Store) -> None:
    store.put("obj/put", io.BytesIO(SMALL))
    assert clean.get("obj/put") == SMALL


def _put_multipart(store: S3Store, clean: Store) -> None:
    store.put("obj/multi", io.BytesIO(MULTI))
    with clean.open_read("obj/multi") as stream:
        assert stream.read() == MULTI


def _put_if_absent(store: S3Store, clean: Store) -> None:
    assert store.put_if_absent("obj/commit", b"mine") is True
    assert clean.get("obj/commit") == b"mine"
    assert clean.put_if_absent("obj/commit", b"theirs") is False


def _list(store: S3Store, clean: Store) -> None:
    for name in ("obj/a", "obj/b", "obj/c/d"):
        clean.put(name, b"x")
    assert store.list("obj/") == ["obj/a", "obj/b", "obj/c/d"]


def _exists(store: S3Store, clean: Store) -> None:
    clean.put("obj/small", SMALL)
    assert store.exists("obj/small") is True


def _delete(store: S3Store, clean: Store) -> None:
    clean.put("obj/small", SMALL)
    store.delete("obj/small")
    assert not clean.exists("obj/small")


OPERATIONS: dict[str, tuple[Callable[[S3Store, Store], None], str, bool]] = {
    # name: (operation, the request the fault spoils, whether its answer has a body)
    "get": (_get, r"^GET /\S+/obj/small$", True),
    "get_missing": (_get_missing, r"^GET /\S+/obj/missing$", True),
    "open_read_small": (_open_read_small, r"^GET /\S+/obj/small$", True),
    "open_read_large": (_open_read_large, r"^GET /\S+/obj/large$", True),
    "put": (_put, r"^PUT /\S+/obj/put$", False),
    "put_multipart_part": (_put_multipart, r"^PUT /\S+/obj/multi\?\S*partNumber=2", False),
    "put_multipart_complete": (_put_multipart, r"^POST /\S+/obj/multi\?uploadId=", True),
    "put_if_absent": (_put_if_absent, r"^PUT /\S+/obj/commit$", False),
    "list": (_list, r"^GET /\S+\?list-type=2&prefix=[^&]*%2Fobj%2F&", True),
    "exists": (_exists, r"^HEAD /\S+/obj/small$", False),
    "delete": (_delete, r"^DELETE /\S+/obj/small$", False),
}
CASES = [(op, kind) for op, (_, _, has_body) in OPERATIONS.items() for kind in KINDS
         if has_body or kind not in BODY_KINDS]


@pytest.mark.parametrize("operation, kind", CASES)
def test_every_fault_on_every_operation_is_survived(bucket: str, proxy: FaultProxy, operation: str,
                                                    kind: str) -> None:
    run, when, _ = OPERATIONS[operation]
    proxy.inject(kind, when=when)
    run(*stores(bucket, f"{operation}-{kind}", proxy))
    assert proxy.pending() == 0
    assert proxy.counts()[kind] == 1


def test_a_body_cut_off_every_time_is_store_unavailable(bucket: str, proxy: FaultProxy) -> None:
    S3Store(bucket, "cut", endpoint_url=proxy.upstream_url).put("obj/small", SMALL)
    proxy.inject("truncate", times=3, when="^GET ")
    store = S3Store(bucket, "cut", endpoint_url=proxy.url, max_attempts=3)
    with pytest.raises(ExcpError) as caught:
        store.get("obj/small")
    assert caught.value.code == "store_unavailable"
    assert "cut off its answer to reading 'obj/small' midway 3 times" in caught.value.message
    assert "\n" not in caught.value.message
    assert proxy.counts()["truncate"] == 3


# --- random faults under excp's own operations -----------------------------------------

def _committed(chain: Chain, step: int) -> bool:
    try:
        chain.commit(step)
    except NotFound:
        return False
    return True


@pytest.mark.slow
def test_pushes_under_random_faults_commit_whole_or_not_at_all(bucket: str, moto_endpoint: str) -> None:
    """30% of requests fail (every kind), and a request is tried 3 times, so both
    outcomes come up: a push returns, and its step is committed, or raises an ExcpError,
    and its step is not committed unless only the answer to its commit record was lost.
    Either way what the store holds verifies on a fault-free store, and a restore
    through the faults gives exactly the fault-free restore, or is refused."""
    tally = {"pushed": 0, "refused": 0, "committed_anyway": 0, "restored": 0, "restore_refused": 0,
             "survived": 0}
    truth: dict[int, str] = {}
    with FaultProxy(moto_endpoint, rate=0.3, seed=11, stall=0.8) as proxy:
        (store, clean), tiny = stores(bucket, "random", proxy, max_attempts=3), TinyRun(seed=5)
        for step in range(2, 14, 2):
            checkpoint = tiny.advance(2)
            before = proxy.faults()
            try:
                returned = api.push(checkpoint, "r", step=step, store=store)[0].created
            except ExcpError:
                returned = False
                tally["refused"] += 1
            committed = _committed(Chain(clean, "r"), step)
            if returned:
                assert committed
                tally["pushed"] += 1
                tally["survived"] += proxy.faults() > before
            else:
                tally["committed_anyway"] += committed
            if committed:
                truth[step] = api.restore("r", step, store=clean).digest()
            if not truth:
                continue
            assert api.verify("r", store=clean).checkpoints == len(truth)
            step_back = random.Random(step).choice(sorted(truth))
            try:
                got = api.restore("r", step_back, store=store).digest()
            except ExcpError:
                tally["restore_refused"] += 1
                continue
            assert got == truth[step_back]  # never a wrong restore
            tally["restored"] += 1
        injected = proxy.faults()
    assert sorted(c.step for c in Chain(clean, "r").commits()) == sorted(truth)
    assert injected > 30
    assert tally["survived"] >= 2 and tally["refused"] >= 1 and tally["restored"] >= 2, (tally, injected)


# --- the service ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[FaultProxy, Server]]:
    """``excp serve`` on a bucket it reaches through a proxy (faults only when asked)."""
    root = tmp_path_factory.mktemp("serve-faults")
    with FaultProxy(moto_endpoint) as proxy:
        server = Server(root, proxied_backend(proxy, root, moto_endpoint)).start()
        try:
            yield proxy, server
        finally:
            server.stop()
            moto_api(moto_endpoint, "reset")


def _restored_by_service(server: Server, run: str, step: int) -> dict:
    response = server.get(f"/v1/runs/{run}/checkpoints/{step}", TEAM_A, params={"format": "torch"})
    assert response.status_code == 200, response.text
    return torch.load(io.BytesIO(response.content), weights_only=True)


@pytest.mark.slow
def test_the_service_answers_503_while_its_store_is_down(service: tuple[FaultProxy, Server]) -> None:
    """The store answers 503 to everything (the client test below has it drop every
    connection instead)."""
    proxy, server = service
    run, tiny = "team-a-down", TinyRun(seed=2)
    assert server.create(run).status_code == 201
    body, recon = coded_archive(server, run, tiny.advance(3), 10, None)
    assert server.put_archive(run, 10, body).status_code == 201
    body, _ = coded_archive(server, run, tiny.advance(3), 20, recon)
    proxy.outage("service_unavailable")
    try:  # both at once: each waits out the service's own retries of the store
        with ThreadPoolExecutor(2) as pool:
            probe = pool.submit(requests.get, server.url("/readyz"), timeout=60)
            push = pool.submit(server.put_archive, run, 20, body).result()
            ready = probe.result()
    finally:
        proxy.restore()
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "store_unavailable")
    assert (push.status_code, push.json()["error"]["code"]) == (503, "store_unavailable"), push.text
    assert proxy.counts()["down"] > 0
    assert [c.step for c in api.list_commits(run, server.store)] == [10]
    # back up: the same server, never restarted, is ready and commits the same push
    assert requests.get(server.url("/readyz"), timeout=60).status_code == 200
    assert server.put_archive(run, 20, body).status_code == 201
    restored = _restored_by_service(server, run, 20)
    expected = api.load_dict(api.restore(run, 20, store=server.store))
    assert all(torch.equal(restored["model"][k], v) for k, v in expected["model"].items())
    assert api.verify(run, store=server.store).checkpoints == 2


def _answered_503(server: Server) -> float:
    return sum(value for (name, labels), value in server.metrics().items()
               if name == "excp_http_requests_total" and ("status", "503") in labels)


@pytest.mark.slow
def test_a_client_pushes_through_a_store_outage(service: tuple[FaultProxy, Server]) -> None:
    """The store goes down (every connection dropped) while a training node pushes; the
    service answers 503 and the client retries until the store is back, then the push
    commits."""
    proxy, server = service
    run, tiny = "team-a-client-outage", TinyRun(seed=4)
    target = ServiceTarget(Client(f"excp://127.0.0.1:{server.port}", TEAM_A, retries=10, backoff=0.5,
                                  max_backoff=2.0, timeout=120))
    with target:
        target.push(tiny.advance(3), run, step=10)
        refused_before = _answered_503(server)
        proxy.outage("drop_before")
        outcome: dict[str, object] = {}

        def push() -> None:
            try:
                outcome["result"] = target.push(tiny.advance(3), run, step=20)[0]
            except ExcpError as err:  # reported below, with the counts
                outcome["error"] = err

        pusher = threading.Thread(target=push)
        pusher.start()
        while _answered_503(server) == refused_before and pusher.is_alive():
            time.sleep(0.2)  # until the service has refused the client at least once
        proxy.restore()
        pusher.join()
        assert "result" in outcome, outcome
        assert outcome["result"].created
        assert _answered_503(server) > refused_before
        assert proxy.counts()["down"] > 0
        restored = target.restore(run, 20)
    assert restored.digest() == api.restore(run, 20, store=server.store).digest()
    assert server.get("/readyz", ADMIN).status_code == 200
