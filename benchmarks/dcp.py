"""excp as a torch.distributed.checkpoint backend against DCP's own file writer.

Spawns ``--ranks`` gloo processes on CPU; each trains an FSDP2-sharded MLP
(``--params`` parameters, AdamW) and saves ``--saves`` steps, ``--every`` training
steps apart, once with ``ExcpStorageWriter`` to a directory store and once with DCP's
``FileSystemWriter``. Prints per save: the wall time of ``dcp.save`` (the slowest
rank's), the bytes stored, and then the time to load the last step on the same ranks.

    python benchmarks/dcp.py --ranks 2 --params 16e6 --saves 4 --every 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from excp.dcp import ExcpStorageReader, ExcpStorageWriter
from excp.dcp.records import ShardedRun
from excp.store import LocalStore


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    torch.manual_seed(0)
    width = 1024
    layers = [torch.nn.Linear(width, width) for _ in range(max(1, round(args.params / width**2)))]
    for layer in layers:
        fully_shard(layer)
    model = fully_shard(torch.nn.Sequential(*layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randn(16, width, generator=torch.Generator().manual_seed(rank))
    rows = []
    for save in range(1, args.saves + 1):
        for _ in range(args.every):
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        step = save * args.every
        timings = {}
        for name, kwargs in (("excp", {"storage_writer": ExcpStorageWriter(f"{root}/store", "bench", step)}),
                             ("dcp", {"checkpoint_id": f"{root}/plain/{step}"})):
            dist.barrier()
            start = time.perf_counter()
            dcp.save(state, **kwargs)
            dist.barrier()
            timings[name] = time.perf_counter() - start
        rows.append({"step": step, "excp_save_s": round(timings["excp"], 2),
                     "dcp_save_s": round(timings["dcp"], 2)})
    model_state, optim_state = get_state_dict(model, optimizer)
    dist.barrier()
    start = time.perf_counter()
    dcp.load({"model": model_state, "optim": optim_state},
             storage_reader=ExcpStorageReader(f"{root}/store", "bench", "latest"))
    dist.barrier()
    load_s = time.perf_counter() - start
    if rank == 0:
        for row in rows:
            step = row["step"]
            excp = ShardedRun(LocalStore(Path(root) / "store"), "bench").commit(step).size
            plain = _size(Path(root) / "plain" / str(step))
            row.update(excp_bytes=excp, dcp_bytes=plain, ratio_vs_dcp=round(plain / excp, 1))
        params = sum(p.numel() for p in model.parameters())
        Path(root, "result.json").write_text(json.dumps({"params": params, "saves": rows,
                                                         "excp_load_latest_s": round(load_s, 2)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--params", type=float, default=16e6)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as root:
        mp.start_processes(_rank, args=(args.ranks, port, args, root), nprocs=args.ranks,
                           start_method="spawn")
        result = json.loads(Path(root, "result.json").read_text())
    print(f"# {args.ranks} ranks (gloo, CPU, {os.cpu_count()} cores), {result['params'] / 1e6:.1f}M params "
          f"+ AdamW, FSDP2; a save every {args.every} steps")
    for row in result["saves"]:
        print(json.dumps(row))
    print(json.dumps({"excp_load_latest_s": result["excp_load_latest_s"]}))


if __name__ == "__main__":
    main()
