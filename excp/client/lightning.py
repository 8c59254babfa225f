"""A PyTorch Lightning callback that keeps a compressed copy of every checkpoint Lightning saves.

::

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=500),
                                    ExcpLightningCallback("run-1", "excp://ckpt-server:8080")])

Lightning stays in charge of *when* to save (``ModelCheckpoint``, or
``trainer.save_checkpoint``); excp hooks ``on_save_checkpoint``, where the checkpoint
dict is already complete — ``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``loops``, callback states — so a restore gives back a file ``trainer.fit(ckpt_path=...)``
resumes from as from Lightning's own. The training loop only waits for a copy of the
tensors; coding against the previous checkpoint and uploading run in the background
(:class:`~excp.client.hook.Checkpointer`). ``on_train_end`` waits for the last upload,
so a failure to save makes ``trainer.fit()`` fail instead of going unnoticed.

One commit per global step: Lightning may build the checkpoint dict more than once at a
step (``ModelCheckpoint(save_last=True)`` saves ``last.ckpt`` with a second dict, two
``ModelCheckpoint`` callbacks save one each), and the dicts differ in callback state, so
only the first is pushed; the run would refuse a different checkpoint at a step it
already has.

What the hook cannot see: ``LightningModule.on_save_checkpoint`` runs after every
callback's, so keys the module adds there are not in excp's copy (keep extra state in
callbacks' ``state_dict`` or in the module's buffers); and ``save_weights_only=True``
checkpoints skip callbacks altogether, so nothing is pushed for them.

Everything in the dict must load with ``torch.load(weights_only=True)``, as Lightning
loads its own files by default: hyper-parameters that are a ``Path`` or a ``Namespace``
are refused (the error comes with the next save or at the end of ``fit``).

Resuming: write a step back as a ``.ckpt`` file and hand it to ``fit``::

    excp.client.restore("run-1", 1500, out="resume.ckpt", target="excp://ckpt-server:8080")
    trainer.fit(model, ckpt_path="resume.ckpt")

With the callback attached, the run goes on from that step if it was the run's latest.
A run keeps one history, so training that starts before the run's latest step (a rerun,
or a resume from an earlier step) is refused in ``on_train_start`` — its saves would be
refused anyway, but only after a save interval of training — and takes a new run name.
"""

from __future__ import annotations

import logging
from typing import Any

from excp.client.hook import follow_saves
from excp.errors import InvalidInput
from excp.store import Store
from excp.target import Target

try:
    import pytorch_lightning as pl
except ImportError as exc:
    raise InvalidInput("excp.client.lightning needs pytorch-lightning: "
                       "pip install -e '.[lightning]' from the excp checkout") from exc

__all__ = ["ExcpLightningCallback"]

log = logging.getLogger("excp.client")


class ExcpLightningCallback(pl.Callback):
    """Pushes each checkpoint Lightning saves to ``run`` on ``target``, as step
    ``trainer.global_step``.

    ``target`` and ``options`` (``token``, ``preset``, ``when_busy``, ``retries``, ...) are
    :class:`~excp.client.hook.Checkpointer`'s, which is ``self.checkpointer``: its
    ``stats`` say what was stored and what it cost the loop.
    """

    def __init__(self, run: str, target: str | Store | Target | None = None, **options: Any) -> None:
        self.checkpointer = follow_saves(run, target, "set ModelCheckpoint(every_n_train_steps=N)", **options)
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        savers = trainer.checkpoint_callbacks
        if stage == "fit" and savers and all(getattr(s, "save_weights_only", False) for s in savers):
            log.warning("excp: run %s: ModelCheckpoint(save_weights_only=True) saves skip callbacks, so "
                        "excp gets none of them; drop save_weights_only to keep checkpoints in excp",
                        self.checkpointer.run)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.checkpointer.check_start(trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        order = [name for name, _ in pl_module.named_parameters()]
        self.checkpointer.save_state(trainer.global_step, checkpoint, param_order=order)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.checkpointer.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Lightning skips ``teardown`` when training fails: finish the upload in flight
        here, quietly, since the training error is the one to report."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001
            log.error("excp: run %s: the last save failed too: %s", self.checkpointer.run, err)

    def close(self) -> None:
        """Finish the last upload (raising its error, if any) and release the target."""
        self.checkpointer.close()

