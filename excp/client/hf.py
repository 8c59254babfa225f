"""A Hugging Face Trainer callback that keeps a compressed copy of every Trainer checkpoint.

::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[ExcpTrainerCallback("gpt-1", "excp://ckpt-server:8080")])

The Trainer stays in charge of *when* to save (``save_steps``, ``save_strategy``) and
of writing its own ``checkpoint-N`` directory; excp takes that directory as it is, so
what a restore gives back is exactly what ``trainer.train(resume_from_checkpoint=...)``
expects, scheduler, RNG states and ``trainer_state.json`` included.

The directory is read during ``on_save``, on the training loop, because it may not be
there for long: ``save_total_limit`` deletes old directories when the next one is
written. Only the reading is synchronous — it is what ``stats.snapshot_s`` counts —
while coding the checkpoint against the previous one and uploading it run in the
background (:class:`~excp.client.hook.Checkpointer`); the previous step's
reconstruction is kept in memory for that, so excp never needs an old directory back
and ``save_total_limit=1`` is fine. ``on_train_end`` waits for the last upload, so a
failure to save makes ``trainer.train()`` fail instead of going unnoticed.

Each push logs one INFO line on the ``excp.client.saves`` logger (step, size, ratio,
time on the training loop). The Trainer leaves Python's logging alone, which then
shows WARNING and above only, and its own INFO lines (``log_level``) go through the
``transformers`` logger, not this one. So when nothing is configured — no handler on
that logger, its parents or the root — the callback gives it one that prints INFO
lines to stderr; a program that configures logging itself (before creating the
callback) decides what it shows.

Resuming: write a step back as a Trainer directory and hand it to a Trainer::

    excp.client.restore("gpt-1", 1200, out="resume/", target="excp://ckpt-server:8080")
    trainer.train(resume_from_checkpoint="resume/")

With the callback attached to the resumed Trainer, the run goes on from that step if it
was the run's latest. A run keeps one history, so a Trainer starting before the run's
latest step (a rerun, or a resume from an earlier step) is refused in ``on_train_begin``
— its saves would be refused anyway, but only after a save interval of training — and
takes a new run name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from excp.client.hook import follow_saves, saves_log
from excp.errors import InvalidInput
from excp.store import Store
from excp.target import Target

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise InvalidInput("excp.client.hf needs transformers: pip install -e '.[hf]' from the excp checkout"
                       ) from exc

__all__ = ["ExcpTrainerCallback"]


class ExcpTrainerCallback(TrainerCallback):
    """Pushes each checkpoint the Trainer saves to ``run`` on ``target``.

    ``target`` and ``options`` (``token``, ``preset``, ``when_busy``, ``retries``, ...) are
    :class:`~excp.client.hook.Checkpointer`'s, which is ``self.checkpointer``: its
    ``stats`` say what was stored and what it cost the loop.
    """

    def __init__(self, run: str, target: str | Store | Target | None = None, **options: Any) -> None:
        self.checkpointer = follow_saves(run, target, "set TrainingArguments(save_steps=N)", **options)
        _show_info(saves_log)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.checkpointer.check_start(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        order = [name for name, _ in model.named_parameters()] if model is not None else None
        self.checkpointer.save_from_disk(state.global_step, directory, order)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.checkpointer.wait()

    def close(self) -> None:
        """Finish the last upload (raising its error, if any) and release the target; the
        Trainer has no hook for a failed ``train()``, so call it when done."""
        self.checkpointer.close()


def _show_info(logger: logging.Logger) -> None:
    """Print ``logger``'s INFO lines to stderr when logging is not configured at all (no
    handler on it or above it); once is enough, and a configured program is left alone."""
    if logger.hasHandlers():
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
