"""A distributed job that saved or loaded through excp ends without aborting.

Every collective DCP runs for a save or a load (its object gathers and broadcasts)
leaves a finished work item on one of gloo's worker threads, holding tensors that
Python owns. The worker frees that item just *after* it wakes the caller, so the
free can land after the script's last line, while Python is finalizing; taking the
GIL then ends the thread inside a C++ destructor and the process aborts with
``terminate called without an active exception``. ``destroy_process_group()`` is
meant to prevent this: freeing the group joins its workers. But under FSDP2 the group
outlives that call, because DTensor's sharding-propagation cache keeps the
DeviceMeshes — and through them the group — alive, so nothing joins the workers
before exit.

At exit, while the interpreter is still whole, :func:`release_meshes` clears that
cache; a group the job has destroyed is then freed and its workers joined before
finalization starts. A job that never calls ``destroy_process_group()`` keeps its
group (torch requires the call), and this changes nothing for it.
"""

from __future__ import annotations

import atexit
import gc
import sys


def release_meshes() -> None:
    """Drop DTensor's cached sharding decisions (and the meshes they hold), then
    collect, so that destroyed process groups are freed now rather than never. Both
    caches are cleared the way torch's own debug helper does, without importing that
    module (its import fails while the interpreter shuts down)."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    import torch
    from torch.distributed.tensor import DTensor

    propagate = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
    propagate.cache_clear()
    clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast_path is not None:
        clear_fast_path()
    gc.collect()


atexit.register(release_meshes)
