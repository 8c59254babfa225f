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
