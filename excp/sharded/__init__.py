"""Sharded runs: steps saved through ``torch.distributed.checkpoint``, one archive per rank.

This is the part every layer needs, so it lives in the core beside :mod:`excp.chain`:

* :mod:`excp.sharded.records`: the store layout and the commit record of a step;
* :mod:`excp.sharded.reader`: a step read back (whole in one process, or the chunks
  DCP's load planner asks for) and checked;
* :mod:`excp.sharded.heads`: each rank's last save in this process, the parent of its
  next one.

The DCP storage backend users hand to ``dcp.save``/``dcp.load`` (it also takes a
target, and holds the writer) is :mod:`excp.dcp`.
"""
