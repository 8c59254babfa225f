"""The store layout of sharded runs, importable under its earlier name.

The records are part of the core now (:mod:`excp.sharded.records`), since the Python
API lists, restores and collects sharded runs too; scripts that import them from
here keep working.
"""

from excp.sharded.records import KIND, ShardedCommit, ShardedRun

__all__ = ["KIND", "ShardedCommit", "ShardedRun"]
