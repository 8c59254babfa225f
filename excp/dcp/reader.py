"""``ExcpStorageReader``: DCP loads a sharded step, on any number of ranks.

The reading itself (which saved ranks hold the chunks a rank asks for, decoding them,
copying the slices out) is the core's :class:`~excp.sharded.reader.ShardedStepReader`;
this class adds what a DCP user passes: a target (a store URL, a Store, or a store
Target) rather than an opened store.
"""

from __future__ import annotations

from excp.dcp.writer import store_of
from excp.sharded.reader import ShardedStepReader
from excp.store import Store
from excp.target import Target


class ExcpStorageReader(ShardedStepReader):
    """Load step ``step`` (or ``latest``) of sharded run ``run`` from ``target``::

        dcp.load(state_dict, storage_reader=ExcpStorageReader("s3://ckpts/team", "llm-7b", "latest"))

    ``device``: where saved shards are decoded (``cuda`` on a GPU node) before the
    requested slices are copied into the state dict's tensors. A step with an exact
    copy loads bit for bit; ``lossy`` loads its reconstruction.
    """

    def __init__(self, target: str | Store | Target | None, run: str, step: int | str = "latest", *,
                 device: str = "cpu", lossy: bool = False) -> None:
        super().__init__(store_of(target), run, step, device=device, lossy=lossy)
