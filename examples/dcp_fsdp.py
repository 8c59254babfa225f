"""FSDP2 + torch.distributed.checkpoint, with excp as the storage: every rank compresses
its own shard. Runs on CPU; run it again and it resumes from the latest step.

    torchrun --nproc-per-node 2 examples/dcp_fsdp.py [STORE]
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from excp import api
from excp.dcp import ExcpStorageReader, ExcpStorageWriter
from excp.errors import NotFound


def train(store: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(64, 64, generator=torch.Generator().manual_seed(dist.get_rank()))

    def state() -> dict:
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    try:  # resume from the latest step, on whatever number of ranks this job has
        start = api.list_commits("fsdp-example", store)[-1].step
        loaded = state()
        dcp.load(loaded, storage_reader=ExcpStorageReader(store, "fsdp-example", start))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    except NotFound:
        start = 0
    for step in range(start + 1, start + 61):
        loss = torch.nn.functional.mse_loss(model(data), data.flip(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:  # all ranks save; the step exists once every rank's archive is in
            dcp.save(state(), storage_writer=ExcpStorageWriter(store, "fsdp-example", step))

    if dist.get_rank() == 0:
        rows = api.list_commits("fsdp-example", store)
        print(f"resumed from step {start}; steps {[c.step for c in rows]}; last step {rows[-1].raw_bytes:,} "
              f"bytes -> {rows[-1].size:,} ({rows[-1].ratio:.1f}x); loss {loss.item():.4f}")


if __name__ == "__main__":
    dist.init_process_group("gloo")  # "cpu:gloo,cuda:nccl" on GPUs
    train(sys.argv[1] if len(sys.argv) > 1 else "./excp-store")  # a directory or s3://... all ranks reach
    dist.destroy_process_group()  # with the model gone, excp frees the group at exit (excp.dcp.shutdown)
