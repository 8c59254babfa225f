"""Shared fixtures: a small real training run that produces checkpoint dicts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


class TinyRun:
    """A small MLP regression trained with AdamW; ``advance(n)`` trains n steps and
    returns the checkpoint dict a user would ``torch.save``."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, amsgrad: bool = False,
                 eps: float | None = None, width: int = 128) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.LayerNorm(width), torch.nn.Linear(width, 32)
        ).to(dtype)
        if eps is None:
            eps = 1e-4 if dtype == torch.float16 else 1e-8  # 1e-8 underflows in fp16
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, amsgrad=amsgrad, eps=eps)
        self.data = torch.randn(256, 32, generator=gen).to(dtype)
        self.target = torch.tanh(self.data @ torch.randn(32, 32, generator=gen).to(dtype))
        self.step = 0

    def loss(self) -> torch.Tensor:
        return ((self.model(self.data) - self.target) ** 2).float().mean()

    def advance(self, n: int) -> dict:
        for _ in range(n):
            self.opt.zero_grad()
            self.loss().backward()
            self.opt.step()
            self.step += 1
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step, "meta": {"note": "tiny", "lr": 3e-3}}


@pytest.fixture
def tiny_run() -> Callable[..., TinyRun]:
    return TinyRun


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own reconstruction cache and no EXCP_STORE from the environment."""
    monkeypatch.setenv("EXCP_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("EXCP_STORE", raising=False)
