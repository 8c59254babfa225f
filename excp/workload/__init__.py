"""A small, real, deterministic training workload.

The demo, the quality benchmark and the tests need genuine checkpoint chains (weights
and AdamW moments that evolve the way training makes them evolve) and a way to tell
whether a run resumed from a compressed checkpoint is as good as the uncompressed one.
Everything here runs on a CPU in seconds and is bit-reproducible from a seed.
"""

from excp.workload.corpus import decode, encode, make_corpus, vocab_size
from excp.workload.model import GPTConfig, TinyGPT, make_model, small_model, tiny_model
from excp.workload.train import ChainResult, TrainConfig, Trainer, make_optimizer, run_chain

__all__ = [
    "ChainResult",
    "GPTConfig",
    "TinyGPT",
    "TrainConfig",
    "Trainer",
    "decode",
    "encode",
    "make_corpus",
    "make_model",
    "make_optimizer",
    "run_chain",
    "small_model",
    "tiny_model",
    "vocab_size",
]
