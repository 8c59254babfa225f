"""The Hugging Face Trainer and Lightning callbacks, in real (tiny, CPU) training runs.

Each run checks what a user relies on: every save the framework makes becomes a commit
coded against the previous one, a restored step is what the framework saved at that
step (within the codec's error), and the framework resumes from the restored copy.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import transformers

import excp.client
from excp.api import list_commits
from excp.codec import adam
from excp.codec.params import PRESETS
from excp.errors import Conflict, InvalidInput

ROOT = Path(__file__).resolve().parents[1]


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_restored(restored: dict[str, torch.Tensor], saved: dict[int, dict[str, torch.Tensor]],
                     step: int, lr: float) -> None:
    """``restored`` is step ``step`` as saved, within the codec's error: every weight
    within half of the coarsest level spacing of the default preset (q·2^COARSER,
    q = lr_step·lr). GPT-2's ``lm_head.weight`` is the embedding itself and is not in
    its files."""
    assert restored.keys() == saved[step].keys() - {"lm_head.weight"}
    bound = 0.5 * PRESETS["default"].lr_step * lr * 2**adam.COARSER * (1 + 1e-5)
    for name, tensor in restored.items():
        assert float((tensor.float() - saved[step][name].float()).abs().max()) <= bound, name


# --- Hugging Face Trainer --------------------------------------------------------------


def _hf_trainer(output_dir: Path, max_steps: int, callbacks: list) -> Any:
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (32, 16))
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=3, save_total_limit=1,
        per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], disable_tqdm=True, logging_steps=100)
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                train_dataset=[{"input_ids": t, "labels": t} for t in tokens],
                                callbacks=callbacks)


def _hf_recorder() -> Any:
    """A test-only callback: the weights at each save and the steps trained."""

    class Recorder(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.saved: dict[int, dict[str, torch.Tensor]] = {}
            self.steps: list[int] = []

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.saved[state.global_step] = _clone(model.state_dict())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps.append(state.global_step)

    return Recorder()


@pytest.mark.slow
def test_trainer_callback_pushes_every_save_and_the_trainer_resumes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from excp.client.hf import ExcpTrainerCallback

    store = str(tmp_path / "store")
    recorder, callback = _hf_recorder(), ExcpTrainerCallback("hf-run", store)
    trainer = _hf_trainer(tmp_path / "out", 9, [recorder, callback])
    trainer.train()
    callback.close()

    # save_total_limit=1 left only the last directory; excp has every save, chained.
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-9"]
    commits = list_commits("hf-run", store)
    assert [c.step for c in commits] == [3, 6, 9]
    assert [c.parent for c in commits[1:]] == [3, 6]
    assert callback.checkpointer.stats.committed == 3

    restored = tmp_path / "restored"
    excp.client.restore("hf-run", 6, out=restored, target=store)
    assert json.loads((restored / "trainer_state.json").read_text())["global_step"] == 6
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "config.json"} <= set(os.listdir(restored))
    _assert_restored(load_file(restored / "model.safetensors"), recorder.saved, 6, 3e-3)

    # Resuming into the same run from an earlier step is refused before a step is trained...
    resumed, callback = _hf_recorder(), ExcpTrainerCallback("hf-run", store)
    same_run = _hf_trainer(tmp_path / "out2", 9, [resumed, callback])
    with pytest.raises(Conflict, match="after step 6 \\(up to 9\\)"):
        same_run.train(resume_from_checkpoint=str(restored))
    callback.close()
    assert resumed.steps == []

    # ... and goes on into a new run.
    callback = ExcpTrainerCallback("hf-run-2", store)
    fresh = _hf_trainer(tmp_path / "out3", 9, [resumed, callback])
    result = fresh.train(resume_from_checkpoint=str(restored))
    callback.close()
    assert resumed.steps == [7, 8, 9]
    assert math.isfinite(result.training_loss)
    assert [c.step for c in list_commits("hf-run-2", store)] == [9]


@contextmanager
def _logging_never_configured() -> Iterator[logging.Logger]:
    """Logging as a training script that never set it up sees it (no handler anywhere,
    not even pytest's); afterwards everything is as it was. Yields the saves logger."""
    saves, handlers = logging.getLogger("excp.client.saves"), logging.root.handlers
    logging.root.handlers = []
    try:
        yield saves
    finally:
        logging.root.handlers = handlers
        for handler in list(saves.handlers):
            saves.removeHandler(handler)
        saves.setLevel(logging.NOTSET)


def _trainer_dir(output_dir: Path, step: int) -> None:
    """A Trainer's ``checkpoint-<step>`` directory, as ``on_save`` finds it."""
    from safetensors.torch import save_file

    directory = output_dir / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    save_file({"w": torch.randn(16, 16), "b": torch.zeros(16)}, directory / "model.safetensors")
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_trainer_callback_counts_its_read_and_logs_each_push(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The directory is read on the training loop: that read is the save's stall, and each
    push says so in one INFO line a user sees without configuring logging."""
    from excp.client import hook
    from excp.client.hf import ExcpTrainerCallback

    clock = [100.0]  # a clock that moves only while the directory is read
    read = hook.load_checkpoint

    def slow_read(path: Path, **kwargs: Any) -> Any:
        clock[0] += 2.5
        return read(path, **kwargs)

    monkeypatch.setattr(hook, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(hook, "load_checkpoint", slow_read)
    _trainer_dir(tmp_path / "out", 3)
    with _logging_never_configured() as saves:
        callback = ExcpTrainerCallback("hf-log", str(tmp_path / "store"))
        callback.on_save(SimpleNamespace(output_dir=str(tmp_path / "out")),
                         SimpleNamespace(global_step=3, is_world_process_zero=True), None)
        callback.close()
        assert len(saves.handlers) == 1
    assert callback.checkpointer.stats.snapshot_s == 2.5
    assert [c.step for c in list_commits("hf-log", str(tmp_path / "store"))] == [3]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("excp: ")]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"excp: run hf-log step 3 committed: keyframe, [\d.]+ K?B stored \([\d.]+x\); "
                        r"2\.50 s on the training loop, [\d.]+ s in the background", lines[0]), lines[0]


def test_trainer_callback_leaves_configured_logging_alone(tmp_path: Path) -> None:
    from excp.client.hf import ExcpTrainerCallback

    assert logging.root.handlers  # pytest's own: logging is configured here
    ExcpTrainerCallback("hf-quiet", str(tmp_path / "store")).close()
    assert logging.getLogger("excp.client.saves").handlers == []


# --- PyTorch Lightning -----------------------------------------------------------------


def _lightning_module() -> Any:

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return Regressor()


def _lightning_recorder() -> Any:
    """A test-only callback: the weights at each step's first save, the steps trained."""

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.saved: dict[int, dict[str, torch.Tensor]] = {}
            self.steps: list[int] = []

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
            self.saved.setdefault(trainer.global_step, _clone(checkpoint["state_dict"]))

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self.steps.append(trainer.global_step)

    return Recorder()


def _lightning_fit(tmp_path: Path, max_steps: int, callbacks: list, ckpt_path: Path | None = None,
                   **checkpointing: Any) -> Any:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    data = DataLoader(TensorDataset(inputs, inputs.sum(1, keepdim=True).sin()), batch_size=16)
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4, **checkpointing)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[saver, *callbacks])
    trainer.fit(_lightning_module(), data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_lightning_callback_pushes_every_save_and_lightning_resumes(tmp_path: Path) -> None:
    from excp.client.lightning import ExcpLightningCallback

    store = str(tmp_path / "store")
    recorder, callback = _lightning_recorder(), ExcpLightningCallback("pl-run", store)
    # save_last=True builds a second, different checkpoint dict at each step: one commit per step.
    _lightning_fit(tmp_path, 12, [recorder, callback], save_top_k=-1, save_last=True)

    commits = list_commits("pl-run", store)
    assert [c.step for c in commits] == [4, 8, 12]
    assert [c.parent for c in commits[1:]] == [4, 8]
    with pytest.raises(InvalidInput, match="closed"):  # teardown closed it
        callback.checkpointer.save_state(13, {})

    ckpt = tmp_path / "resume.ckpt"
    excp.client.restore("pl-run", 8, out=ckpt, target=store)
    restored = torch.load(ckpt, weights_only=True)  # as Lightning loads it by default
    assert restored["global_step"] == 8 and len(restored["optimizer_states"]) == 1
    _assert_restored(restored["state_dict"], recorder.saved, 8, 1e-2)

    # Resuming into the same run from an earlier step is refused before a step is trained...
    resumed = _lightning_recorder()
    with pytest.raises(Conflict, match="after step 8 \\(up to 12\\)"):
        _lightning_fit(tmp_path / "again", 12, [resumed, ExcpLightningCallback("pl-run", store)],
                       ckpt_path=ckpt)
    assert resumed.steps == []

    # ... and goes on into a new run.
    trainer = _lightning_fit(tmp_path / "again", 12, [resumed, ExcpLightningCallback("pl-run-2", store)],
                             ckpt_path=ckpt)
    assert resumed.steps == [8, 9, 10, 11]
    assert trainer.global_step == 12
    assert math.isfinite(float(trainer.callback_metrics["loss"]))
    assert [c.step for c in list_commits("pl-run-2", store)] == [12]


def test_lightning_callback_warns_when_checkpoints_skip_callbacks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from excp.client.lightning import ExcpLightningCallback

    callback = ExcpLightningCallback("pl-weights", str(tmp_path / "store"))
    _lightning_fit(tmp_path, 4, [callback], save_weights_only=True)
    assert "save_weights_only" in caplog.text
    assert callback.checkpointer.stats.saves == 0


# --- the examples ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("script", "module", "run", "steps", "promised"), [
    ("hf_trainer.py", "transformers", "gpt-tiny", [4, 8, 12, 16, 20],
     "resumed from step 12 to step 20: training loss "),
    ("lightning_loop.py", "pytorch_lightning", "mlp-tiny", [8, 16, 24, 32, 40],
     "resumed from step 24 to step 40: loss "),
])
def test_example_runs_end_to_end(tmp_path: Path, script: str, module: str, run: str, steps: list[int],
                                 promised: str) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(store)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = re.search(rf"^stored 3 checkpoints in {re.escape(str(store))}: .* \(([0-9.]+)x\)$", done.stdout,
                       re.MULTILINE)
    assert stored is not None and float(stored.group(1)) > 1, done.stdout
    resumed = next(line for line in done.stdout.splitlines() if line.startswith(promised))
    assert math.isfinite(float(resumed[len(promised):].split(";")[0]))
    assert f"the run has steps {steps}" in resumed
    assert [c.step for c in list_commits(run, str(store))] == steps


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["hf", "lightning"])
@pytest.mark.parametrize(("options", "match"), [
    ({"run": "no spaces allowed"}, "invalid run name"),
    ({"when_busy": "later"}, "when_busy='later'"),
    ({"every": 10}, "takes no 'every'"),
    ({"token": "secret"}, "a token is for an excp service"),
])
def test_bad_options_give_one_line_errors(tmp_path: Path, module: str, options: dict, match: str) -> None:
    if module == "hf":
        from excp.client.hf import ExcpTrainerCallback as Callback
    else:
        from excp.client.lightning import ExcpLightningCallback as Callback
    options = {"run": "ok-run", "target": str(tmp_path / "store"), **options}
    with pytest.raises(InvalidInput, match=match) as caught:
        Callback(**options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("excp.client.hf", "transformers", "hf"),
    ("excp.client.lightning", "pytorch_lightning", "lightning"),
])
def test_a_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, framework: str,
                                             extra: str) -> None:
    monkeypatch.setitem(sys.modules, framework, None)  # what an uninstalled package imports as
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(InvalidInput, match=re.escape(f"pip install -e '.[{extra}]'")):
        importlib.import_module(module)
