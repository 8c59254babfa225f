"""The allocator settings excp's own processes apply."""

import platform

import pytest

from excp import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_thresholds() -> None:
    assert memory.tune_allocator() is True
