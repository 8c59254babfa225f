"""Bearer tokens with scopes over run-name prefixes.

A tokens file (or ``$EXCP_TOKENS``) is JSON::

    {"tokens": [{"name": "ci", "token": "...", "scopes": ["write"], "prefixes": ["team-a-"]}],
     "anonymous": {"scopes": ["read"], "prefixes": [""]}}

Scopes nest: ``write`` implies ``read`` and ``admin`` (deletes) implies both. A token
acts only on runs whose name starts with one of its prefixes (``""`` is every run);
run names cannot hold ``/``, so a prefix cannot be escaped. Requests without a token
get the ``anonymous`` grant, and only if one is configured. Presented tokens are
hashed and compared with every configured token's hash by ``hmac.compare_digest``,
without stopping at a match, so timing says nothing about which token, or how much of
one, was right.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from excp.errors import Forbidden, InvalidInput, Unauthorized

MIN_TOKEN_LENGTH = 16
_PREFIX = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
_NEW_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class Scope(str, enum.Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


_IMPLIED = {Scope.READ: {Scope.READ}, Scope.WRITE: {Scope.READ, Scope.WRITE},
            Scope.ADMIN: {Scope.READ, Scope.WRITE, Scope.ADMIN}}


@dataclass(frozen=True)
class Grant:
    """What a token (or anonymity) may do: scopes over run-name prefixes."""

    scopes: frozenset[Scope]
    prefixes: tuple[str, ...]

    def covers(self, run: str) -> bool:
        return any(run.startswith(prefix) for prefix in self.prefixes)

    def allows(self, scope: Scope, run: str) -> bool:
        return scope in self.scopes and self.covers(run)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a named token, or ``anonymous``."""

    name: str
    grant: Grant

    @property
    def anonymous(self) -> bool:
        return self.name == "anonymous"

    def require(self, scope: Scope, run: str) -> None:
        """Raise unless this principal may do ``scope`` on ``run``: 401 for anonymous
        requests (a token might help), 403 for a token that does not cover it."""
        if self.grant.allows(scope, run):
            return
        if self.anonymous:
            raise Unauthorized(f"{scope.value} access to run {run!r} needs a token: "
                               "send Authorization: Bearer <token>")
        raise Forbidden(f"token {self.name!r} has no {scope.value} access to run {run!r}: "
                        "use a token whose scopes and prefixes cover it")

    def may_read(self, run: str) -> bool:
        return self.grant.allows(Scope.READ, run)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """The configured tokens and the anonymous grant (None: no anonymous access)."""

    def __init__(self, tokens: Iterable[tuple[str, str, Grant]], anonymous: Grant | None) -> None:
        self._tokens = [(name, _digest(token), grant) for name, token, grant in tokens]
        self.anonymous = anonymous

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._tokens]

    def authenticate(self, token: str | None) -> Principal:
        """The principal for a presented bearer token (None: no Authorization header)."""
        if token is None:
            if self.anonymous is None:
                raise Unauthorized("this server needs a token: send Authorization: Bearer <token>")
            return Principal("anonymous", self.anonymous)
        presented = _digest(token)
        found: Principal | None = None
        for name, digest, grant in self._tokens:
            if hmac.compare_digest(digest, presented) and found is None:
                found = Principal(name, grant)
        if found is None:
            raise Unauthorized("unknown token: check the token, or ask the server's operator for one")
        return found

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        """A table from the JSON of a tokens file; every mistake is InvalidInput naming
        ``source`` and the entry."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"{source} is not valid JSON ({exc}); see docs/service.md#tokens") from None
        if not isinstance(data, dict) or set(data) - {"tokens", "anonymous"}:
            raise InvalidInput(f"{source} must be a JSON object with only 'tokens' and 'anonymous'")
        entries = data.get("tokens", [])
        if not isinstance(entries, list):
            raise InvalidInput(f"{source}: 'tokens' must be a list")
        tokens: list[tuple[str, str, Grant]] = []
        for i, entry in enumerate(entries):
            label = f"{source}: token #{i + 1}"
            if not isinstance(entry, dict) or set(entry) - {"name", "token", "scopes", "prefixes"}:
                raise InvalidInput(f"{label} must be an object with name, token, scopes and prefixes")
            name, token = entry.get("name"), entry.get("token")
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"{label} needs a 'name'")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise InvalidInput(f"{label} ({name!r}) needs a 'token' of at least {MIN_TOKEN_LENGTH} "
                                   f"characters; make one with {_NEW_TOKEN}")
            if any(name == n or token == t for n, t, _ in tokens):
                raise InvalidInput(f"{label} ({name!r}) repeats the name or token of another entry")
            tokens.append((name, token, _grant(entry, f"{label} ({name!r})")))
        anonymous = data.get("anonymous")
        if anonymous is not None:
            if not isinstance(anonymous, dict) or set(anonymous) - {"scopes", "prefixes"}:
                raise InvalidInput(f"{source}: 'anonymous' must be an object with scopes and prefixes")
            anonymous = _grant(anonymous, f"{source}: anonymous")
        return cls(tokens, anonymous)


def _grant(entry: dict[str, Any], label: str) -> Grant:
    scopes, prefixes = entry.get("scopes"), entry.get("prefixes")
    names = [s.value for s in Scope]
    if not isinstance(scopes, list) or not scopes or any(s not in names for s in scopes):
        raise InvalidInput(f"{label}: 'scopes' must be a non-empty list of {names}")
    if not isinstance(prefixes, list) or not prefixes:
        raise InvalidInput(f"{label}: 'prefixes' must be a non-empty list of run-name prefixes "
                           '(["team-a-"], or [""] for every run)')
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidInput(f"{label}: prefix {prefix!r} is not the start of a valid run name")
    implied = frozenset(s for name in scopes for s in _IMPLIED[Scope(name)])
    return Grant(implied, tuple(prefixes))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOCAL_GRANT = Grant(frozenset({Scope.READ, Scope.WRITE}), ("",))


def load_tokens(host: str, tokens_file: str | Path | None, env_json: str | None) -> TokenTable:
    """The token table ``excp serve`` runs with.

    ``--tokens FILE`` wins over ``$EXCP_TOKENS``. With neither, a loopback host gets
    anonymous read and write (a laptop's ``excp serve``), and any other host is refused:
    a service reachable from the network never starts open by accident.
    """
    if tokens_file is not None:
        path = Path(tokens_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInput(f"cannot read tokens file {path} ({exc.strerror}); check --tokens") from None
        return TokenTable.parse(text, str(path))
    if env_json:
        return TokenTable.parse(env_json, "$EXCP_TOKENS")
    if is_loopback(host):
        return TokenTable([], LOCAL_GRANT)
    raise InvalidInput(f"refusing to serve on {host} without tokens: pass --tokens FILE or set "
                       "EXCP_TOKENS (anonymous access is only the default on a loopback host)")
