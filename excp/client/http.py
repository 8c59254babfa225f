"""The REST client: every call of ``excp serve``, typed results, typed errors, retries.

Every request is safe to repeat — runs are created idempotently, an upload of the
same checkpoint is a no-op (200), restores and listings only read — so a failed
attempt is retried with exponential backoff and jitter: on connection errors,
timeouts, 408 (the service cut a slow upload off), 429 and any 5xx. A refused
connection is the exception: nothing listens at the URL (a service not started, a
wrong port), so it is retried once, quickly, in case the service is just starting,
and then reported — unless ``retry_refused`` asks for the full policy, as the
training-loop hook does to outlive a service restart. Other answers are raised at
once as the :class:`~excp.errors.ExcpError` subclass their stable ``code`` names (409
→ :class:`~excp.errors.Conflict`, 404 → :class:`~excp.errors.NotFound`, ...), with the
server's one-line message. A service that stays unreachable after the last attempt
is :class:`~excp.errors.ServiceUnavailable`. Retries are logged at INFO on the
``excp.client`` logger: not shown unless logging is set up to show them.

Bodies are streamed both ways: uploads are read from a file as they are sent (so a
retry rewinds the file), downloads are written to a file as they arrive. The token
comes from the argument or ``$EXCP_TOKEN`` and is only ever sent in the
``Authorization`` header, never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import httpx
import tenacity

from excp import __version__
from excp.chain import Base, Commit, PushResult, archive_digest
from excp.codec.params import CodecParams
from excp.errors import CorruptData, ExcpError, InvalidInput, ServiceUnavailable, error_for_code
from excp.exact import ExactCommit
from excp.target import service_url

log = logging.getLogger("excp.client")

T = TypeVar("T")
_CHUNK = 1 << 20
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_COMMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Commit))
_EXACT_FIELDS = tuple(f.name for f in dataclasses.fields(ExactCommit))
_STATUS_CODES = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 409: "conflict", 413: "too_large", 422: "corrupt_data"}


@dataclass(frozen=True)
class RunInfo:
    """A run as the service describes it: its options, its head, its chain statistics,
    and the exact copies of its committed links."""

    name: str
    params: CodecParams
    base: Base | None
    keep_exact: int
    exact: tuple[ExactCommit, ...]
    created_at: float | None
    head: Commit | None
    checkpoints: int
    keyframes: int
    stored_bytes: int
    raw_bytes: int
    ratio: float | None


@dataclass(frozen=True)
class Download:
    """What a restore wrote: the step it resolved to (``latest``) and the checkpoint's layout."""

    step: int
    layout: str
    path: Path
    size: int


class _Retry(Exception):
    """An answer worth another attempt (408, 429, 5xx), carrying the error it would raise."""

    def __init__(self, error: ExcpError) -> None:
        super().__init__(error.message)
        self.error = error


def commit_of(fields: dict[str, Any]) -> Commit:
    """A commit record from the service's JSON (which adds ``run`` and ``ratio``)."""
    try:
        return Commit(**{name: fields[name] for name in _COMMIT_FIELDS})
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"the service sent a malformed checkpoint record ({exc}); "
                          "check that it runs the same excp version") from None


def exact_of(fields: dict[str, Any]) -> ExactCommit:
    """An exact copy's record from the service's JSON (which adds ``created`` to an upload's)."""
    try:
        return ExactCommit(**{name: fields[name] for name in _EXACT_FIELDS})
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"the service sent a malformed exact copy record ({exc}); "
                          "check that it runs the same excp version") from None


class Client:
    """One excp service. ``retries`` is how many times a failed request is repeated,
    waiting ``backoff`` seconds before the first repeat and doubling up to
    ``max_backoff``; ``timeout`` bounds each read and write (a restore that the server
    takes long to reconstruct waits that long for its first byte). ``retry_refused``:
    retry refused connections like other failures, rather than once."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0, retries: int = 6,
                 backoff: float = 0.5, max_backoff: float = 30.0, retry_refused: bool = False) -> None:
        self.url = service_url(url)
        self.retry_refused = retry_refused
        token = token if token is not None else os.environ.get("EXCP_TOKEN") or None
        headers = {"User-Agent": f"excp/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._retrying = tenacity.Retrying(
            retry=self._worth_retrying,
            stop=tenacity.stop_after_attempt(retries + 1),
            wait=tenacity.wait_exponential(multiplier=backoff, max=max_backoff)
            + tenacity.wait_random(0, backoff),
            before_sleep=self._log_retry, reraise=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------

    def _worth_retrying(self, state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, (httpx.TransportError, _Retry)):
            return False
        return self.retry_refused or not _refused(exc) or state.attempt_number < 2

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("excp: service %s: %s; retrying in %.1f s (attempt %d)", self.url,
                 _describe(exc), wait, state.attempt_number + 1)

    def _attempts(self, attempt: Callable[[], T], what: str) -> T:
        """``attempt()`` under the retry policy, its failures as excp errors."""
        try:
            return self._retrying(attempt)
        except _Retry as exc:
            raise exc.error from None
        except httpx.TransportError as exc:
            if _refused(exc):
                raise ServiceUnavailable(f"cannot reach the excp service at {self.url}: connection refused; "
                                         "start it with `excp serve` or check --server") from None
            raise ServiceUnavailable(f"cannot {what}: the excp service at {self.url} did not answer "
                                     f"({_describe(exc)}); check that it runs and the URL") from None

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        error = _error_of(response)
        if response.status_code in _RETRY_STATUS:
            raise _Retry(error)
        raise error

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        return self._send(method, path, what, **kwargs).json()

    def _send(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        return self._attempts(lambda: self._check(self._http.request(method, path, **kwargs)), what)

    @contextmanager
    def _stream(self, path: str, what: str, params: dict[str, str] | None = None,
                ) -> Iterator[Callable[[BinaryIO], httpx.Response]]:
        """Yield a function that downloads ``path`` into a file (rewound on each retry)."""
        def fetch(out: BinaryIO) -> httpx.Response:
            def attempt() -> httpx.Response:
                out.seek(0)
                out.truncate()
                with self._http.stream("GET", path, params=params) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    for chunk in response.iter_bytes(_CHUNK):
                        out.write(chunk)
                    return response
            return self._attempts(attempt, what)
        yield fetch

    def _upload(self, method: str, path: str, source: str | Path | BinaryIO, what: str,
                params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> PushResult:
        fields = self._upload_json(method, path, source, what, params, headers)
        return PushResult(commit_of(fields), bool(fields.get("created")), {})

    def _upload_json(self, method: str, path: str, source: str | Path | BinaryIO, what: str,
                     params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                     ) -> dict[str, Any]:
        with _opened(source) as body:
            def attempt() -> Any:
                body.seek(0)
                response = self._http.request(method, path, content=_chunks(body), params=params,
                                              headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(_size(body)),
                                                       **(headers or {})})
                return self._check(response)
            response = self._attempts(attempt, what)
        return response.json()

    # --- service ------------------------------------------------------------------

    def health(self) -> bool:
        """Whether the service answers ``/healthz`` (no retries: a probe)."""
        try:
            return self._http.get("/healthz", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> dict[str, Any]:
        """``/readyz``: the service and its store; raises while the store is down."""
        return self._json("GET", "/readyz", "check readiness")

    def metrics(self) -> str:
        """The Prometheus exposition text of ``/metrics``."""
        return self._send("GET", "/metrics", "read metrics").text

    # --- runs ---------------------------------------------------------------------

    def create_run(self, name: str, preset: str = "default", params: dict[str, Any] | None = None,
                   base: Base | tuple[int, str] | None = None, keep_exact: int = 0) -> RunInfo:
        """Create ``name`` (a no-op if it exists with the same options; Conflict otherwise),
        keeping an exact copy of its newest ``keep_exact`` steps."""
        body: dict[str, Any] = {"name": name, "preset": preset, "params": params or {},
                                "keep_exact": keep_exact}
        if base is not None:
            seed, factory = (base.seed, base.factory) if isinstance(base, Base) else base
            body["base"] = {"seed": seed, "factory": factory}
        return _run_info(self._json("POST", "/v1/runs", f"create run {name!r}", json=body))

    def run(self, name: str) -> RunInfo:
        return _run_info(self._json("GET", f"/v1/runs/{_seg(name)}", f"read run {name!r}"))

    def runs(self) -> list[str]:
        """Every run the token may read (all pages)."""
        names: list[str] = []
        after: str | None = None
        while True:
            page = self._json("GET", "/v1/runs", "list runs",
                              params={"limit": 1000, **({"after": after} if after else {})})
            names += page["runs"]
            after = page["next"]
            if after is None:
                return names

    def delete_run(self, name: str) -> None:
        """Delete a run and all its checkpoints (admin tokens only)."""
        self._send("DELETE", f"/v1/runs/{_seg(name)}", f"delete run {name!r}")

    # --- checkpoints ----------------------------------------------------------------

    def checkpoints(self, run: str) -> list[Commit]:
        """Every commit record of ``run`` in step order (all pages)."""
        found: list[Commit] = []
        after: int | None = None
        while True:
            params = {"limit": 1000, **({"after": after} if after is not None else {})}
            page = self._json("GET", f"/v1/runs/{_seg(run)}/checkpoints", f"list run {run!r}", params=params)
            found += [commit_of(c) for c in page["checkpoints"]]
            after = page["next"]
            if after is None:
                return found

    def meta(self, run: str, step: int | str = "latest") -> Commit:
        return commit_of(self._json("GET", f"/v1/runs/{_seg(run)}/checkpoints/{step}/meta",
                                    f"read run {run!r} step {step}"))

    def upload_archive(self, run: str, step: int, archive: str | Path | BinaryIO) -> PushResult:
        """Upload an archive coded with :func:`excp.chain.encode_archive` against the head;
        the service verifies and commits it in the same request."""
        return self._upload("PUT", f"/v1/runs/{_seg(run)}/checkpoints/{step}/archive", archive,
                            f"upload run {run!r} step {step}")

    def upload_exact(self, run: str, step: int, archive: str | Path | BinaryIO) -> tuple[ExactCommit, bool]:
        """Upload the exact copy of ``step``'s committed link, coded with
        :func:`excp.exact.encode_copy`; returns its record and whether it was created."""
        fields = self._upload_json("PUT", f"/v1/runs/{_seg(run)}/checkpoints/{step}/exact", archive,
                                   f"upload the exact copy of run {run!r} step {step}")
        return exact_of(fields), bool(fields.get("created"))

    def upload_raw(self, run: str, step: int, checkpoint: str | Path | BinaryIO,
                   kind: str = "torch") -> PushResult:
        """Upload a ``torch.save`` file (or, with ``kind="safetensors"``, a safetensors
        file) for the service to compress and commit."""
        return self._upload("POST", f"/v1/runs/{_seg(run)}/checkpoints/{step}/raw", checkpoint,
                            f"upload run {run!r} step {step}", params={"kind": kind})

    def restore(self, run: str, step: int | str, out: str | Path, fmt: str = "torch",
                lossy: bool = False) -> Download:
        """Let the service reconstruct ``step`` and stream it into the file ``out``:
        ``torch`` (the checkpoint as pushed), ``safetensors`` or ``tar`` (a Trainer
        directory); bit for bit where the step has an exact copy, unless ``lossy``."""
        target = Path(out)
        query = {"format": fmt, **({"lossy": "true"} if lossy else {})}
        with self._stream(f"/v1/runs/{_seg(run)}/checkpoints/{step}", f"restore run {run!r} step {step}",
                          query) as fetch, open(target, "wb") as handle:
            response = fetch(handle)
            size = handle.tell()
        return Download(int(response.headers["X-Excp-Step"]), response.headers.get("X-Excp-Layout", ""),
                        target, size)

    def download_archive(self, run: str, commit: Commit, out: BinaryIO) -> None:
        """The stored archive of ``commit``, checked against its digest as it arrives."""
        self._download_checked(f"/v1/runs/{_seg(run)}/checkpoints/{commit.step}/archive",
                               f"run {run!r} step {commit.step}", commit.digest, commit.size, out)

    def download_exact(self, run: str, record: ExactCommit, out: BinaryIO) -> None:
        """The stored exact copy ``record`` names, checked against its digest as it arrives."""
        self._download_checked(f"/v1/runs/{_seg(run)}/checkpoints/{record.step}/exact",
                               f"run {run!r} step {record.step} (exact copy)", record.digest,
                               record.size, out)

    def _download_checked(self, path: str, label: str, digest: str, size: int, out: BinaryIO) -> None:
        """Stream a stored archive into ``out`` and rewind it, or fail if its bytes are
        not the ones its record names."""
        with self._stream(path, f"download {label}") as fetch:
            fetch(out)
        got = archive_digest(out)
        if got != digest or out.tell() != size:
            raise CorruptData(f"{label}: the downloaded archive does not match its commit record "
                              f"(digest {got}, {out.tell()} bytes); run `excp verify` on the server")
        out.seek(0)

    def delete_checkpoint(self, run: str, step: int) -> None:
        """Delete a checkpoint no other restore goes through (admin tokens only)."""
        self._send("DELETE", f"/v1/runs/{_seg(run)}/checkpoints/{step}", f"delete run {run!r} step {step}")


def _seg(name: str) -> str:
    """A run name as one path segment (the service refuses bad names with a clear 400)."""
    return quote(name, safe="")


def _refused(exc: BaseException | None) -> bool:
    """Whether nothing listens at the address (the cause httpx wraps, two levels down)."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, _Retry):
        return f"[{exc.error.code}] {exc.error.message}"
    return f"{type(exc).__name__}: {exc}" if exc is not None else "failed"


def _error_of(response: httpx.Response) -> ExcpError:
    """The excp error a failed answer stands for: by its JSON code, else by its status."""
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        code = _STATUS_CODES.get(response.status_code, "service_unavailable")
        message = f"the excp service answered HTTP {response.status_code}"
    cls = error_for_code(code)
    if cls is ExcpError:
        cls = error_for_code(_STATUS_CODES.get(response.status_code, "service_unavailable"))
    return cls(message)


def _run_info(fields: dict[str, Any]) -> RunInfo:
    base = fields.get("base")
    head = fields.get("head")
    return RunInfo(name=fields["name"], params=CodecParams.from_dict(fields["params"]),
                   base=Base(**base) if base else None, keep_exact=int(fields.get("keep_exact", 0)),
                   exact=tuple(exact_of(r) for r in fields.get("exact", ())),
                   created_at=fields.get("created_at"),
                   head=commit_of(head) if head else None, checkpoints=fields["checkpoints"],
                   keyframes=fields["keyframes"], stored_bytes=fields["stored_bytes"],
                   raw_bytes=fields["raw_bytes"], ratio=fields["ratio"])


@contextmanager
def _opened(source: str | Path | BinaryIO) -> Iterator[BinaryIO]:
    if not isinstance(source, (str, Path)):
        yield source
        return
    if not Path(source).is_file():
        raise InvalidInput(f"{source} is not a file: give the path of the file to upload")
    with open(source, "rb") as handle:
        yield handle


def _size(handle: BinaryIO) -> int:
    position = handle.tell()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(position)
    return size


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(_CHUNK):
        yield chunk
