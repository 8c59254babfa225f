"""Each rank's last save in this process: the reconstruction its next save is coded against.

The writer keeps a rank's reconstruction after a save; the reader keeps it after
loading the rank's own shard, so that a job resumed on the same topology goes on with
links rather than a keyframe. A kept head is used only while the tensors are laid
out the same way (same world size and sharding), which :func:`layout_of` tells.
Memory: one reconstruction (the rank's weights) per rank saved or loaded here.
"""

from __future__ import annotations

import threading

import torch

from excp.bundle import Bundle, Role
from excp.chain import Head
from excp.store import Store

Layout = dict[str, tuple[torch.Size, torch.dtype, Role]]

_HEADS: dict[tuple[str, str, int], tuple[Head, Layout]] = {}  # (store, run, rank) -> last save, its layout
_LOCK = threading.Lock()


def remember(store: Store, run: str, rank: int, head: Head, bundle: Bundle) -> None:
    """Keep ``head`` as the parent of this process's next save of ``rank``."""
    with _LOCK:
        _HEADS[(store.url, run, rank)] = (head, layout_of(bundle))


def recall(store: Store, run: str, rank: int) -> tuple[Head | None, Layout | None]:
    """The head kept for ``rank`` and the layout of the bundle it came from (None, None: none)."""
    with _LOCK:
        return _HEADS.get((store.url, run, rank), (None, None))


def layout_of(bundle: Bundle) -> Layout:
    """Every tensor's name, shape, dtype and role: equal between two saves of a rank
    exactly when the world size and the sharding stayed the same."""
    return {e.name: (e.tensor.shape, e.tensor.dtype, e.role) for e in bundle.tensors.values()}
