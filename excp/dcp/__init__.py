"""excp as a ``torch.distributed.checkpoint`` storage backend: every rank compresses
its own shard, the coordinator commits the step all-or-nothing, and any number of
ranks (or one process) loads it back.

* :class:`ExcpStorageWriter` (:mod:`excp.dcp.writer`) and :class:`ExcpStorageReader`
  (:mod:`excp.dcp.reader`) implement DCP's StorageWriter / StorageReader;
* :mod:`excp.dcp.items` turns a rank's write items into a bundle (moments paired with
  weights by FQN);
* :mod:`excp.dcp.shutdown` lets a job end cleanly after ``destroy_process_group()``.

The store layout and commit record of a sharded run, and reading a step back, are the
core's (:mod:`excp.sharded`): the Python API and the CLI read sharded runs without
this package.
"""

from excp.dcp import shutdown  # noqa: F401  (registers the exit hook)
from excp.dcp.reader import ExcpStorageReader
from excp.dcp.writer import ExcpStorageWriter
from excp.sharded.reader import load_state_dict

__all__ = ["ExcpStorageReader", "ExcpStorageWriter", "load_state_dict"]
