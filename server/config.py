"""Everything ``create_app`` needs, with the defaults ``excp serve`` documents."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from excp.cache import cache_root
from excp.errors import InvalidInput
from server.auth import LOCAL_GRANT, TokenTable

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MAX_JSON_BODY = 1 << 20
"""Bodies of requests that are not uploads (run creation) are small JSON."""


def parse_size(text: str, option: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1048576"`` → bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidInput(f"invalid size {text!r} for {option}: use e.g. 8GiB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs.

    ``store`` is a store URL (None: ``$EXCP_STORE``, else ``./excp-store``). ``workers``
    is the number of processes that compress raw uploads and reconstruct checkpoints,
    so the event loop never does tensor work. ``cache_bytes`` bounds the on-disk cache
    of reconstructed checkpoints (0 disables it). ``allowed_factories`` lists the model
    factories (``pkg.module:fn``) a run may be created from with a seed: the server
    imports and calls them, so it never accepts one it was not told to trust.
    ``client_timeout`` bounds how long a client may keep the server waiting: for a
    request's headers (:mod:`server.serving`) and for each stretch of its body
    (:mod:`server.limits`).
    """

    store: str | None = None
    tokens: TokenTable = field(default_factory=lambda: TokenTable([], LOCAL_GRANT))
    max_body: int = 8 << 30
    cache_dir: Path = field(default_factory=lambda: cache_root() / "serve")
    cache_bytes: int = 2 << 30
    workers: int = 2
    allowed_factories: tuple[str, ...] = ()
    client_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInput(f"--workers must be at least 1, got {self.workers}")
        if self.max_body < 1:
            raise InvalidInput("--max-body must be at least 1 byte")
        if self.cache_bytes < 0:
            raise InvalidInput("--cache-size must not be negative")
        if not self.client_timeout > 0:
            raise InvalidInput(f"--client-timeout must be more than 0 seconds, got {self.client_timeout:g}")
