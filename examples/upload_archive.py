"""Push checkpoints to an excp service over plain HTTP: each archive is coded here,
against the run's head, and the service verifies and commits it.

    excp serve &
    python examples/upload_archive.py [URL] [TOKEN]     # default: http://127.0.0.1:8080, no token
"""

import dataclasses
import io
import sys

import requests
import torch

from excp import api
from excp.chain import Commit, encode_archive
from excp.codec.params import CodecParams

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
auth = {"Authorization": f"Bearer {sys.argv[2]}"} if len(sys.argv) > 2 else {}
run = "upload-example"
requests.post(f"{url}/v1/runs", json={"name": run, "preset": "default"}, headers=auth).raise_for_status()
recon = None  # the head's reconstruction, kept between pushes


def push(checkpoint: dict, step: int) -> None:
    global recon
    info = requests.get(f"{url}/v1/runs/{run}", headers=auth).json()
    head = info["head"] and Commit(**{f.name: info["head"][f.name] for f in dataclasses.fields(Commit)})
    out = io.BytesIO()
    _, new_recon = encode_archive(run, CodecParams.from_dict(info["params"]), head,
                                  api.to_bundle(checkpoint), step, out, lambda _: recon)
    requests.put(f"{url}/v1/runs/{run}/checkpoints/{step}/archive", data=out.getvalue(),
                 headers=auth).raise_for_status()
    recon = new_recon


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.randn(256, 64)
for step in range(1, 31):
    loss = torch.nn.functional.mse_loss(model(data), data)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0:
        push({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, step)

rows = requests.get(f"{url}/v1/runs/{run}/checkpoints", headers=auth).json()["checkpoints"]
print(f"run {run}: " + ", ".join(f"step {c['step']} {c['ratio']:.1f}x" for c in rows))
