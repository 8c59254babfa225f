"""``excp bench``: compression ratio, training quality and speed of checkpoint
compressors, side by side on the same checkpoints.

Modules, one job each: :mod:`~excp.bench.contenders` (the compressors behind one
interface), :mod:`~excp.bench.inputs` (the workload's checkpoints or a user's files),
:mod:`~excp.bench.protocol` (reference run, open and closed loop),
:mod:`~excp.bench.measure` (time and peak memory), :mod:`~excp.bench.runner` (settings
to figures) and :mod:`~excp.bench.report` (markdown, JSON, plots).
"""

from excp.bench.runner import Settings, run

__all__ = ["Settings", "run"]
