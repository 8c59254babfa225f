"""Model factories that tests pass as ``--model-factory tests.factories:NAME``."""

import torch


def mlp(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    model.register_buffer("scale", torch.full((16,), 0.5))  # a float buffer: not a weight
    return model
