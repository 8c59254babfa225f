"""Deterministic, exactly resumable training of :class:`TinyGPT` on the generated corpus.

Everything random is derived from ``(seed, step)`` rather than carried along in a
stateful generator, so a run resumed from a checkpoint at step ``s`` sees the same
batches (and dropout masks) as the run that never stopped. That is the property the
closed-loop benchmark relies on: any difference between a compressed and an uncompressed
run is then caused by the compression and nothing else.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from excp.errors import InvalidInput
from excp.workload.corpus import encode, make_corpus
from excp.workload.model import GPTConfig, get_config, make_model

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "rng")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters chosen so the ``small`` preset is still clearly improving after a
    thousand steps, while 300 steps take under a minute on two idle CPU cores."""

    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    corpus_chars: int = 1_000_000
    data_seed: int = 0
    eval_windows: int = 128


def make_optimizer(
    model: nn.Module,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights and both embeddings) only.

    Biases and LayerNorm gains are vectors whose scale is meaningful, so decaying them
    only hurts. Parameters are given with their names, so the optimizer's state dict
    records ``param_names`` and a compressor can pair each moment with its weight.
    """
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


@dataclass
class WarmupCosine:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio`` at ``total_steps``.

    A callable object rather than a closure because ``LambdaLR`` saves an object's
    attributes in its state dict, so a resumed run keeps its original horizon.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=4)
def _token_splits(corpus_chars: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/held-out token tensors (90/10), cached because generating and encoding a
    megabyte of text costs more than a hundred training steps of the tiny model."""
    tokens = torch.tensor(encode(make_corpus(corpus_chars, data_seed)), dtype=torch.long)
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:]


def _mix(*parts: int) -> int:
    """Combine integers into one seed with a splitmix64 step, so nearby ``(seed, step)``
    pairs give unrelated streams."""
    h = 0
    for part in parts:
        h = (h ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Trainer:
    """Model, optimizer, schedule and data of one run, checkpointable at any step.

    ``total_steps`` is the horizon of the cosine schedule; training past it continues at
    the minimum learning rate.
    """

    def __init__(
        self,
        config: str | GPTConfig,
        seed: int = 0,
        total_steps: int = 1000,
        train: TrainConfig | None = None,
    ) -> None:
        self.config = get_config(config)
        self.train_config = train or TrainConfig()
        self.seed = seed
        self.step = 0
        tc = self.train_config
        self.model = make_model(self.config, seed)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, tc.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(tc.warmup_steps, total_steps, tc.min_lr_ratio)
        )
        self._train_tokens, val_tokens = _token_splits(tc.corpus_chars, tc.data_seed)
        window = self.config.block_size + 1
        if len(self._train_tokens) <= window or len(val_tokens) < tc.eval_windows * window:
            raise ValueError(
                f"corpus_chars={tc.corpus_chars} is too small for {tc.eval_windows} eval "
                f"windows of {window} characters"
            )
        self._eval_windows = val_tokens[: tc.eval_windows * window].view(-1, window)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(_mix(self.seed, step, 1))
        high = len(self._train_tokens) - self.config.block_size - 1
        starts = torch.randint(0, high, (self.train_config.batch_size,), generator=generator)
        offsets = torch.arange(self.config.block_size + 1)
        chunk = self._train_tokens[starts[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def train_steps(self, n: int) -> float:
        """Train ``n`` steps; returns their mean training loss."""
        self.model.train()
        total = 0.0
        for _ in range(n):
            x, y = self._batch(self.step)
            # Dropout draws from the global RNG; seeding a fork of it per step makes the
            # masks a function of (seed, step) without touching the caller's RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, self.step, 2))
                loss = self._loss(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.train_config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            total += loss.item()
        return total / max(n, 1)

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean loss on fixed held-out windows, the same for every seed and step, so
        curves of different runs are directly comparable."""
        was_training = self.model.training
        self.model.eval()
        batches = self._eval_windows.split(self.train_config.batch_size)
        total = sum(self._loss(b[:, :-1], b[:, 1:]).item() * len(b) for b in batches)
        self.model.train(was_training)
        return total / len(self._eval_windows)

    def state_dict(self) -> dict:
        """The full checkpoint, as deep copies: a chain keeps earlier checkpoints to
        compute residuals against, and live tensors would change under it."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": {"seed": self.seed},
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off (its seed and schedule win over this
        trainer's, since they define the run being resumed)."""
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise InvalidInput(f"checkpoint lacks {', '.join(missing)}; pass a full state dict")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.seed = int(state["rng"]["seed"])


@dataclass
class ChainResult:
    """Eval-loss curve ``[(step, loss)]`` of a run, starting at step 0."""

    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


OnCheckpoint = Callable[[int, dict], dict | None]


def run_chain(
    config: str | GPTConfig,
    steps: int,
    every: int,
    seed: int,
    on_checkpoint: OnCheckpoint | None = None,
    train: TrainConfig | None = None,
) -> ChainResult:
    """Train ``steps`` steps, handing a checkpoint to ``on_checkpoint(step, state)`` every
    ``every`` steps.

    If the callback returns a state dict, training continues from it: the closed loop of
    the ExCP paper, where compression error feeds back into training. Losses at checkpoint
    steps are measured after that restore, so the curve shows the damage the
    reconstruction did and the final loss whether training recovered from it.
    """
    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be >= 1, got steps={steps}, every={every}")
    trainer = Trainer(config, seed, total_steps=steps, train=train)
    result = ChainResult([(0, trainer.eval_loss())])
    while trainer.step < steps:
        trainer.train_steps(min(every - trainer.step % every, steps - trainer.step))
        if on_checkpoint is not None and trainer.step % every == 0:
            restored = on_checkpoint(trainer.step, trainer.state_dict())
            if restored is not None:
                if int(restored.get("step", -1)) != trainer.step:
                    raise InvalidInput(
                        f"on_checkpoint returned a state for step {restored.get('step')!r}, "
                        f"expected step {trainer.step}"
                    )
                trainer.load_state_dict(restored)
        result.curve.append((trainer.step, trainer.eval_loss()))
    return result
