"""Where archives and commit records live: a :class:`Store` behind a URL.

``open_store`` is the one place that turns a user's ``--store``/``EXCP_STORE`` string
into a backend, so the CLI, the hook and the server accept the same forms.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from excp.errors import InvalidInput
from excp.store.base import Store, validate_key
from excp.store.local import LocalStore
from excp.store.memory import MemoryStore

__all__ = ["LocalStore", "MemoryStore", "Store", "open_store", "validate_key"]

DEFAULT_STORE = "./excp-store"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_FORMS = "a directory path, file://DIR, memory://[NAME], s3://BUCKET or s3://BUCKET/PREFIX"


def open_store(url: str | None = None) -> Store:
    """Open the store named by ``url``.

    ``None`` means ``$EXCP_STORE``, else ``./excp-store``. Accepted forms: a directory
    path or ``file://DIR`` (a :class:`LocalStore`; the directory is made on first
    write), ``memory://NAME`` (the process-wide :class:`MemoryStore` of that name),
    ``memory://`` (a new, empty one) and ``s3://BUCKET[/PREFIX]`` (an
    :class:`~excp.store.s3.S3Store`; endpoint, region and credentials come from the
    environment, see :mod:`excp.store.s3`).
    """
    if url is None:
        url = os.environ.get("EXCP_STORE") or DEFAULT_STORE
    match = _SCHEME.fullmatch(url)
    if match is None:
        if not url:
            raise InvalidInput(f"empty store URL: give {_FORMS}")
        return LocalStore(url)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        if not rest:
            raise InvalidInput(f"store URL {url!r} names no directory: use file:///abs/dir")
        return LocalStore(unquote(rest))  # as Path.as_uri() quoted it
    if scheme == "memory":
        return MemoryStore.named(rest) if rest else MemoryStore()
    if scheme == "s3":
        from excp.store.s3 import S3Store  # boto3 takes a while to import; only S3 users pay

        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidInput(f"store URL {url!r} names no bucket: use s3://BUCKET or s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix)
    raise InvalidInput(f"unsupported store URL {url!r}: use {_FORMS}")
