"""A GPT-2 style character model small enough to train on a laptop CPU.

Its checkpoints have the shape of real ones (embeddings, attention and MLP matrices,
LayerNorm vectors, biases, AdamW moments for each), which is what the compression codec
has to handle; its size is what makes a closed-loop benchmark run in seconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from excp.workload.corpus import vocab_size


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0


PRESETS: dict[str, GPTConfig] = {
    # ~0.41M parameters: trains 100 steps in about a second, for tests.
    "tiny": GPTConfig(vocab_size(), block_size=64, n_layer=2, n_head=4, n_embd=128),
    # ~3.2M parameters: still learning after thousands of steps, for the demo and benchmark.
    "small": GPTConfig(vocab_size(), block_size=64, n_layer=4, n_head=4, n_embd=256),
}


def get_config(config: str | GPTConfig) -> GPTConfig:
    """Accept a preset name wherever a config is expected, so CLIs can pass strings."""
    if isinstance(config, GPTConfig):
        return config
    try:
        return PRESETS[config]
    except KeyError:
        raise ValueError(f"unknown model preset {config!r}; choose from {sorted(PRESETS)}") from None


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """Decoder-only transformer; ``forward`` maps token ids ``(B, T)`` to logits ``(B, T, V)``.

    The output projection reuses ``tok_emb.weight`` through ``F.linear`` instead of a tied
    ``lm_head`` module: a tied module would list the same storage under two state-dict
    keys, which safetensors refuses and a compressor would count twice.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self._init_weights()

    @classmethod
    def from_config(cls, config: GPTConfig) -> TinyGPT:
        return cls(**asdict(config))

    def _init_weights(self) -> None:
        """GPT-2 initialisation; residual output projections are scaled down by depth so
        the residual stream's variance does not grow with the number of blocks."""
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)


def make_model(config_name: str | GPTConfig, seed: int) -> TinyGPT:
    """A freshly initialised model, bit-identical for the same config and seed.

    The global RNG is forked so building a model neither depends on nor disturbs the
    caller's random state; that is what lets a chain's base be rebuilt from its seed.
    """
    config = get_config(config_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT.from_config(config)


def tiny_model(seed: int) -> nn.Module:
    """Model factory for ``pkg.module:fn`` references: the ``tiny`` preset."""
    return make_model("tiny", seed)


def small_model(seed: int) -> nn.Module:
    """Model factory for ``pkg.module:fn`` references: the ``small`` preset."""
    return make_model("small", seed)
