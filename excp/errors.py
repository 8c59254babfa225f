"""One exception hierarchy for everything excp reports to a user.

Every error carries a stable machine-readable ``code`` (used by the REST service and
by scripts), the HTTP status the service answers with, and the exit code of the CLI.
Messages name what is wrong and what to do about it, in one line.
"""

from __future__ import annotations


class ExcpError(Exception):
    """Base of every error excp raises on purpose."""

    code = "excp_error"
    http_status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ExcpError):
    """The user's input is not something excp can take (not a checkpoint, NaN, bad option)."""

    code = "invalid_input"
    http_status = 400
    exit_code = 2


class NotFound(ExcpError):
    """A run, step, archive or key does not exist."""

    code = "not_found"
    http_status = 404
    exit_code = 3


class Conflict(ExcpError):
    """The request contradicts what is stored (step not after the head, a different
    checkpoint under an existing step)."""

    code = "conflict"
    http_status = 409
    exit_code = 4


class ChainMismatch(Conflict):
    """A checkpoint does not fit its chain (shapes or dtypes changed, init hash differs)."""

    code = "chain_mismatch"


class CorruptData(ExcpError):
    """Stored bytes fail a check: truncated, bad checksum, inconsistent table."""

    code = "corrupt_data"
    http_status = 422
    exit_code = 5


class UnsupportedVersion(CorruptData):
    """An archive or record written by a format version this excp cannot read."""

    code = "unsupported_version"
    exit_code = 6


class StoreUnavailable(ExcpError):
    """The store cannot be reached or refused the operation."""

    code = "store_unavailable"
    http_status = 503
    exit_code = 7


class Unauthorized(ExcpError):
    """No credentials, or credentials that match no token (service)."""

    code = "unauthorized"
    http_status = 401
    exit_code = 8


class Forbidden(ExcpError):
    """A valid token whose scopes or run-name prefixes do not cover the request (service)."""

    code = "forbidden"
    http_status = 403
    exit_code = 8


class TooLarge(ExcpError):
    """A request body over the service's configured limit."""

    code = "too_large"
    http_status = 413
    exit_code = 2


class RequestTimeout(ExcpError):
    """A client that kept the service waiting for its request body past ``--client-timeout``
    (service): the connection is closed and nothing is committed; send it again."""

    code = "request_timeout"
    http_status = 408
    exit_code = 7


class WorkerFailed(StoreUnavailable):
    """A service's compression/restore worker process died (killed, out of memory): retry."""

    code = "worker_failed"


class ServiceUnavailable(StoreUnavailable):
    """The service cannot be reached, or kept failing after retries."""

    code = "service_unavailable"


def error_for_code(code: str) -> type[ExcpError]:
    """The class of a stable error code, as a client reads it from the service."""
    stack: list[type[ExcpError]] = [ExcpError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return ExcpError
