"""The ranks of tests/test_dcp.py: each function runs in a spawned process of a gloo
process group on CPU and writes what it saw to a JSON file for the test to check."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from excp.dcp import ExcpStorageReader, ExcpStorageWriter

WIDTH = 64
LR = 3e-3


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def _leave() -> None:
    """Tear the group down as any job should; excp.dcp frees it at exit once the
    worker's model is gone (excp.dcp.shutdown)."""
    dist.destroy_process_group()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(),
                                torch.nn.Linear(4 * WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> float:
    data = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(seed))
    target = torch.tanh(data.flip(1))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        optimizer.step()
    return loss.item()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _capture_logs(path: Path) -> None:
    handler = logging.FileHandler(path)
    logging.getLogger("excp.dcp").addHandler(handler)
    logging.getLogger("excp.dcp").setLevel(logging.INFO)


def save_chain(rank: int, world: int, port: int, store: str, plain: str, steps: list[int],
               out: str, async_last: bool = False) -> None:
    """Train and save ``steps`` with excp and, for comparison, uncompressed DCP."""
    _join(rank, world, port)
    _capture_logs(Path(out) / f"log-{world}-{rank}.txt")
    model, optimizer = _model()
    done = 0
    for i, step in enumerate(steps):
        _train(model, optimizer, step - done, seed=step)
        done = step
        state = _state(model, optimizer)
        writer = ExcpStorageWriter(store, "fsdp", step)
        if async_last and i == len(steps) - 1:
            dcp.async_save(state, storage_writer=writer).result()
        else:
            dcp.save(state, storage_writer=writer)
        dcp.save(state, checkpoint_id=f"{plain}/{step}")
    _leave()


def load_and_continue(rank: int, world: int, port: int, store: str, plain: str, step: int, next_step: int,
                      out: str) -> None:
    """Load ``step`` on ``world`` ranks from excp and from the uncompressed copy, compare,
    then train on and save ``next_step`` with this topology."""
    _join(rank, world, port)
    _capture_logs(Path(out) / f"log-{world}-{rank}.txt")
    model, optimizer = _model()
    state = _state(model, optimizer)
    dcp.load(state, storage_reader=ExcpStorageReader(store, "fsdp", step))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    reference_model, reference_optimizer = _model()
    reference = _state(reference_model, reference_optimizer)
    dcp.load(reference, checkpoint_id=f"{plain}/{step}")
    errors = {}
    for name, tensor in state["model"].items():
        got, want = tensor.full_tensor(), reference["model"][name].full_tensor()
        errors[name] = float((got - want).abs().max())
    loss = _train(model, optimizer, next_step - step, seed=next_step)
    dcp.save(_state(model, optimizer), storage_writer=ExcpStorageWriter(store, "fsdp", next_step))
    if rank == 0:
        (Path(out) / f"load-{world}.json").write_text(json.dumps({"errors": errors, "loss": loss}))
    _leave()


class _Dying(ExcpStorageWriter):
    """Rank 1 dies (as a killed process does) half-way through writing its shard."""

    def _write_rank(self, rank: int, bundle: Any, keep: int) -> tuple[str, Any]:
        if rank == 1:
            os._exit(17)
        return super()._write_rank(rank, bundle, keep)


def save_and_die(rank: int, world: int, port: int, store: str, steps: list[int]) -> None:
    """Commit ``steps[:-1]``, then lose rank 1 while saving ``steps[-1]``."""
    _join(rank, world, port)
    model, optimizer = _model()
    for step in steps:
        _train(model, optimizer, 2, seed=step)
        writer = (_Dying if step == steps[-1] else ExcpStorageWriter)(store, "dying", step)
        dcp.save(_state(model, optimizer), storage_writer=writer)
    _leave()


def _full(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a state dict by path, DTensors gathered whole (a collective: every
    rank calls it on the same tree)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.full_tensor() if hasattr(tree, "full_tensor") else tree.clone()}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _full(value, f"{prefix}/{key}").items()}
    return {}


def save_exact(rank: int, world: int, port: int, store: str, plain: str, steps: list[int], out: str) -> None:
    """Save ``steps`` keeping the exact copy of the newest, then load each step back on
    these ranks and tell, per step, whether every tensor came back bit for bit."""
    _join(rank, world, port)
    model, optimizer = _model()
    saved = {}
    for step in steps:
        _train(model, optimizer, 2, seed=step)
        state = _state(model, optimizer)
        dcp.save(state, storage_writer=ExcpStorageWriter(store, "exact", step, keep_exact=1))
        dcp.save(state, checkpoint_id=f"{plain}/{step}")
        saved[step] = _full(state)
    equal = {}
    for step in steps:
        fresh_model, fresh_optimizer = _model()
        state = _state(fresh_model, fresh_optimizer)
        dcp.load(state, storage_reader=ExcpStorageReader(store, "exact", step))
        loaded = _full(state)
        equal[step] = loaded.keys() == saved[step].keys() and all(
            t.dtype == saved[step][n].dtype and torch.equal(t, saved[step][n]) for n, t in loaded.items())
    if rank == 0:
        (Path(out) / "exact.json").write_text(json.dumps({str(s): e for s, e in equal.items()}))
    _leave()
