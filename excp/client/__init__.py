"""Using excp from a training job: the REST client, the training-loop hook, restore.

* :class:`Checkpointer` — one line in a training loop; compresses and uploads in the
  background (:mod:`excp.client.hook`).
* :func:`restore` — checkpoint N (or ``latest``) straight into a model and optimizer.
* :func:`open_target` — a store URL or a service URL behind one interface, a
  :class:`Target` (:mod:`excp.target`, :mod:`excp.client.target`); :class:`Client` —
  every REST call of the service (:mod:`excp.client.http`).
* Framework callbacks, optional extras: :mod:`excp.client.hf` (Hugging Face Trainer,
  ``pip install excp[hf]``) and :mod:`excp.client.lightning` (``excp[lightning]``).
"""

from excp.client.hook import Checkpointer, HookStats, restore
from excp.client.http import Client, RunInfo
from excp.client.target import ServiceTarget, open_target
from excp.target import StoreTarget, Target

__all__ = ["Checkpointer", "Client", "HookStats", "RunInfo", "ServiceTarget", "StoreTarget", "Target",
           "open_target", "restore"]
