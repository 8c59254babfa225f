"""Property-based fuzzing (hypothesis) of everything excp reads from a store or an
upload: the archive reader and decoder, and the commit records of chains and of
sharded steps.

The archives start from the golden ones (a keyframe and a link of every codec
configuration). Two kinds of damage: raw bytes (flips, truncations, insertions), which
the checksums must catch; and changes to the index *with every checksum made right
again*, which reach the tensor table, the codec metadata and the stream sizes, so the
decoder itself is what must refuse them. Either way the only acceptable outcome is a
decoded bundle or an ``ExcpError``; anything else (a ``RuntimeError`` from torch, a
``MemoryError``, a hang) is a finding. Memory is bounded: the decoder may allocate a
few times the archive's declared raw sizes, never what a forged header claims.

Regressions found by these runs live in ``tests/fuzz/regressions`` (one archive or
record per file, replayed by ``test_regressions``). The CI run is short
(``EXCP_FUZZ_EXAMPLES``, default 60 per property); ``benchmarks/fuzz.py`` runs long
campaigns and counts them for docs/reliability.md.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from excp.bundle import Bundle
from excp.chain import Commit
from excp.codec.pipeline import decode_archive
from excp.errors import ExcpError
from excp.format.container import ArchiveReader
from excp.sharded.records import ShardedCommit
from tests.test_format import _index, _with_raw_index

GOLDEN = Path(__file__).parent.parent / "golden" / "v1"
REGRESSIONS = Path(__file__).parent / "regressions"
SEEDS = sorted(GOLDEN.glob("*/*.excp"))
EXAMPLES = int(os.environ.get("EXCP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("EXCP_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_LIMIT = 64 << 20

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 64), max_value=1 << 64),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner,
                                                                             max_size=4)),
                          max_leaves=12)


def decode_only_excp_errors(data: bytes) -> str | Bundle:
    """Open and decode ``data`` as a keyframe (or against nothing): the bundle, or the
    ExcpError's code. Any other exception, or too much memory, fails the test."""
    tracemalloc.start()
    try:
        reader = ArchiveReader(io.BytesIO(data), len(data), "fuzzed archive")
        outcome: str | Bundle = decode_archive(reader, None)[0]
    except ExcpError as err:
        outcome = err.code
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated for a {len(data)}-byte archive"
    return outcome


@functools.cache
def _decoded(seed: Path) -> Bundle:
    outcome = decode_only_excp_errors(seed.read_bytes())
    assert isinstance(outcome, Bundle)
    return outcome


def _same(got: Bundle, want: Bundle) -> bool:
    return got.tensors.keys() == want.tensors.keys() and got.extras == want.extras and all(
        torch.equal(got.tensors[n].tensor.view(-1).view(torch.uint8), e.tensor.view(-1).view(torch.uint8))
        for n, e in want.tensors.items())


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document (dict keys and list indices from the root)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


@FUZZ
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_raw_damage_is_an_excp_error(seed: Path, data: st.DataObject) -> None:
    archive = bytearray(seed.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
    at = data.draw(st.integers(0, len(archive) - 1))
    if kind == "flip":
        archive[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del archive[at:]
    elif kind == "insert":
        archive[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        archive[at:at + 64] = bytes(len(archive[at:at + 64]))
    outcome = decode_only_excp_errors(bytes(archive))
    if isinstance(outcome, Bundle):  # damage to a byte that carries nothing (a reserved field)
        assert _same(outcome, _decoded(seed)), "a damaged archive decoded to different tensors"


@FUZZ
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_a_forged_index_with_good_checksums_is_an_excp_error(seed: Path, data: st.DataObject) -> None:
    original = seed.read_bytes()
    index = _index(original)
    path = data.draw(st.sampled_from(_paths(index)[1:]))
    value = data.draw(json_value | st.integers(min_value=1 << 30, max_value=1 << 62))
    forged = json.dumps(_replace(index, path, value)).encode()
    decode_only_excp_errors(_with_raw_index(original, forged))


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 20, 1 << 20], [-1], [2, 1 << 62]])
def test_a_tensor_claiming_a_terabyte_is_refused_before_allocating(shape: list[int]) -> None:
    original = (GOLDEN / "uniform" / "4.excp").read_bytes()
    index = _index(original)
    index["units"][0]["tensors"][0]["shape"] = shape
    assert decode_only_excp_errors(_with_raw_index(original, json.dumps(index).encode())) == "corrupt_data"


@FUZZ
@given(fields=json_value)
def test_commit_records_are_read_or_refused(fields: Any) -> None:
    for reader in (Commit.from_json, ShardedCommit.from_json):
        for data in (json.dumps(fields).encode(), json.dumps({"version": 1, "x": fields}).encode()):
            try:
                reader(data, "fuzzed record")
            except ExcpError as err:
                assert err.code == "corrupt_data"


@FUZZ
@given(data=st.binary(max_size=256), field=st.sampled_from(
    ["step", "archive", "digest", "size", "parent", "keyframe", "depth", "ranks", "metadata"]),
    value=json_value)
def test_commit_records_with_one_wrong_field(data: bytes, field: str, value: Any) -> None:
    good = {"step": 5, "archive": "runs/r/archives/x.excp", "digest": "ab", "size": 10, "parent": None,
            "keyframe": True, "depth": 0, "num_parameters": 1, "raw_bytes": 4, "input_digest": "cd",
            "created_at": 1.0, "version": 1}
    sharded = {"step": 5, "world_size": 1, "ranks": [{"rank": 0, **good}], "metadata": "m",
               "metadata_size": 3, "created_at": 1.0, "version": 1}
    for reader, record in ((Commit.from_json, good), (ShardedCommit.from_json, sharded)):
        for candidate in (json.dumps({**record, field: value}).encode(), data):
            try:
                reader(candidate, "fuzzed record")
            except ExcpError as err:
                assert err.code == "corrupt_data"


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.excp")), ids=lambda p: p.name)
def test_regressions(path: Path) -> None:
    """Archives a fuzzing run once failed on: each must now be refused cleanly."""
    assert not isinstance(decode_only_excp_errors(path.read_bytes()), Bundle)
