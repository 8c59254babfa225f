"""The pusher's cache of the head's reconstruction, outside the store.

Coding step t needs the reconstruction of step t−1. The hook keeps it in memory;
the CLI, a new process per push, keeps it here (``$EXCP_CACHE`` or
``~/.cache/excp``) as a safetensors file named by the commit's archive digest. The
cache is never trusted over the store: an entry is used only if its name matches the
head's digest, and anything else falls back to decoding the chain.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from excp.codec.pipeline import Reconstruction


def cache_root() -> Path:
    return Path(os.environ.get("EXCP_CACHE") or Path.home() / ".cache" / "excp")


class ReconCache:
    """Latest reconstruction per (store, run)."""

    def __init__(self, store_url: str, run: str, root: Path | None = None) -> None:
        key = hashlib.blake2b(f"{store_url}\0{run}".encode(), digest_size=12).hexdigest()
        self.dir = (root or cache_root()) / "recon" / key

    def _path(self, step: int, digest: str) -> Path:
        return self.dir / f"{step:012d}-{digest}.safetensors"

    def get(self, step: int, digest: str) -> Reconstruction | None:
        path = self._path(step, digest)
        if not path.exists():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            return None

    def put(self, step: int, digest: str, recon: Reconstruction) -> None:
        """Keep only this entry for the run; a failure to cache is never an error."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            target = self._path(step, digest)
            tmp = target.with_suffix(".tmp")
            save_file({k: v.contiguous().cpu() for k, v in recon.items()}, tmp)
            os.replace(tmp, target)
            for old in self.dir.glob("*.safetensors"):
                if old != target:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
