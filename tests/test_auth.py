"""Tokens, scopes, prefixes and the defaults of ``excp serve``, without a server."""

from __future__ import annotations

import json

import pytest

from excp.errors import Forbidden, InvalidInput, Unauthorized
from server.auth import Scope, TokenTable, is_loopback, load_tokens
from server.config import parse_size

WRITER = "w" * 24
READER = "r" * 24


def _table(anonymous: dict | None = None) -> TokenTable:
    data = {"tokens": [
        {"name": "writer", "token": WRITER, "scopes": ["write"], "prefixes": ["team-a-", "shared-"]},
        {"name": "reader", "token": READER, "scopes": ["read"], "prefixes": ["team-a-"]},
        {"name": "root", "token": "x" * 32, "scopes": ["admin"], "prefixes": [""]},
    ]}
    if anonymous is not None:
        data["anonymous"] = anonymous
    return TokenTable.parse(json.dumps(data), "tokens.json")


def test_tokens_grant_nested_scopes_over_prefixes() -> None:
    table = _table()
    writer = table.authenticate(WRITER)
    assert writer.name == "writer"
    writer.require(Scope.WRITE, "team-a-run")
    writer.require(Scope.READ, "shared-1")  # write implies read
    with pytest.raises(Forbidden, match="no admin access"):
        writer.require(Scope.ADMIN, "team-a-run")
    with pytest.raises(Forbidden, match="no read access to run 'team-b-run'"):
        writer.require(Scope.READ, "team-b-run")
    reader = table.authenticate(READER)
    assert reader.may_read("team-a-1") and not reader.may_read("team-ab")
    with pytest.raises(Forbidden, match="no write access"):
        reader.require(Scope.WRITE, "team-a-1")
    root = table.authenticate("x" * 32)
    root.require(Scope.ADMIN, "anything")
    root.require(Scope.READ, "anything")


def test_unknown_or_missing_tokens_are_401() -> None:
    table = _table()
    with pytest.raises(Unauthorized, match="unknown token"):
        table.authenticate(WRITER[:-1] + "x")
    with pytest.raises(Unauthorized, match="needs a token"):
        table.authenticate(None)


def test_anonymous_only_as_configured() -> None:
    table = _table(anonymous={"scopes": ["read"], "prefixes": ["public-"]})
    anonymous = table.authenticate(None)
    assert anonymous.anonymous and anonymous.may_read("public-1")
    with pytest.raises(Unauthorized, match="read access to run 'team-a-1' needs a token"):
        anonymous.require(Scope.READ, "team-a-1")  # a token might help: 401, not 403
    with pytest.raises(Unauthorized):
        anonymous.require(Scope.WRITE, "public-1")
    with pytest.raises(Unauthorized, match="unknown token"):
        table.authenticate("not-a-configured-token")  # a bad token never falls back to anonymous


_OK = {"name": "a", "token": "t" * 20, "scopes": ["read"], "prefixes": [""]}


@pytest.mark.parametrize(("entry", "problem"), [
    ({**_OK, "token": "short"}, "at least 16 characters"),
    ({**_OK, "scopes": ["root"]}, "'scopes' must be"),
    ({**_OK, "prefixes": ["../"]}, "not the start of a valid run"),
    ({**_OK, "prefixes": []}, "'prefixes' must be"),
    ({k: v for k, v in _OK.items() if k != "prefixes"}, "'prefixes' must be"),
    ({**_OK, "admin": True}, "must be an object"),
])
def test_bad_token_entries_are_refused(entry: dict, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        TokenTable.parse(json.dumps({"tokens": [entry]}), "tokens.json")


def test_duplicate_tokens_and_bad_json_are_refused() -> None:
    twice = {"name": "a", "token": "t" * 20, "scopes": ["read"], "prefixes": [""]}
    with pytest.raises(InvalidInput, match="repeats the name or token"):
        TokenTable.parse(json.dumps({"tokens": [twice, {**twice, "name": "b"}]}), "tokens.json")
    with pytest.raises(InvalidInput, match="tokens.json is not valid JSON"):
        TokenTable.parse("{", "tokens.json")


def test_serve_defaults_open_only_on_loopback(tmp_path) -> None:
    local = load_tokens("127.0.0.1", None, None)
    anonymous = local.authenticate(None)
    anonymous.require(Scope.WRITE, "any-run")
    with pytest.raises(Unauthorized):
        anonymous.require(Scope.ADMIN, "any-run")  # deletes always need a token
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(InvalidInput, match="refusing to serve on 0.0.0.0 without tokens"):
        load_tokens("0.0.0.0", None, None)
    from_env = load_tokens("0.0.0.0", None, json.dumps({"tokens": [
        {"name": "env", "token": "e" * 20, "scopes": ["read"], "prefixes": [""]}]}))
    assert from_env.names == ["env"] and from_env.anonymous is None
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [
        {"name": "file", "token": "f" * 20, "scopes": ["read"], "prefixes": [""]}]}))
    assert load_tokens("0.0.0.0", path, json.dumps({"tokens": []})).names == ["file"]  # the file wins
    with pytest.raises(InvalidInput, match="cannot read tokens file"):
        load_tokens("127.0.0.1", tmp_path / "missing.json", None)


@pytest.mark.parametrize(("text", "size"), [("8GiB", 8 << 30), ("500MB", 500_000_000), ("1024", 1024),
                                            ("1.5 KiB", 1536), ("0", 0)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, "--max-body") == size


def test_bad_size_names_the_option() -> None:
    with pytest.raises(InvalidInput, match="invalid size '8 gigs' for --max-body"):
        parse_size("8 gigs", "--max-body")
