"""The server's on-disk cache of reconstructed checkpoints: bounded, LRU, never a partial file."""

from __future__ import annotations

import os

from server.restore_cache import RestoreCache


def _put(cache: RestoreCache, key: str, data: bytes) -> bytes:
    staged = cache.staging()
    staged.write_bytes(data)
    with cache.commit(key, staged) as handle:
        return handle.read()


def test_entries_are_bounded_least_recently_used_first(tmp_path) -> None:
    cache = RestoreCache(tmp_path / "c", max_bytes=250)
    _put(cache, "a", b"a" * 100)
    _put(cache, "b", b"b" * 100)
    os.utime(tmp_path / "c" / "a", (1, 1))
    os.utime(tmp_path / "c" / "b", (2, 2))
    with cache.open("a") as handle:  # a use makes "a" the most recent
        assert handle.read() == b"a" * 100
    _put(cache, "c", b"c" * 100)
    assert cache.open("b") is None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a", "c"]


def test_an_entry_over_the_bound_is_still_served_whole(tmp_path) -> None:
    cache = RestoreCache(tmp_path / "c", max_bytes=0)
    assert _put(cache, "big", b"x" * 1000) == b"x" * 1000
    assert cache.open("big") is None
    assert list((tmp_path / "c").iterdir()) == []


def test_keys_follow_every_archive_of_the_restore(tmp_path) -> None:
    key = RestoreCache.key("file:///s", "r", "torch", ["d1", "d2"], None)
    assert key == RestoreCache.key("file:///s", "r", "torch", ["d1", "d2"], None)
    others = [RestoreCache.key("file:///s", "r", "torch", ["d0", "d2"], None),
              RestoreCache.key("file:///s", "r", "safetensors", ["d1", "d2"], None),
              RestoreCache.key("file:///s", "r2", "torch", ["d1", "d2"], None),
              RestoreCache.key("file:///t", "r", "torch", ["d1", "d2"], None)]
    assert key not in others and len(set(others)) == len(others)


def test_partial_writes_of_a_killed_server_are_swept(tmp_path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "0123.part").write_bytes(b"half")
    (root / "0123.part.d.part").mkdir()
    (root / "kept").write_bytes(b"whole")
    cache = RestoreCache(root, max_bytes=1 << 20)
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    with cache.open("kept") as handle:
        assert handle.read() == b"whole"
