"""Byte counts as people read them, in the CLI's tables and the hook's log lines."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1234567`` as ``1.2 MB`` (decimal units, as disks and object stores count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
