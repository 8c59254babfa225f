"""A plain PyTorch loop with the excp hook; run it twice and the second run resumes.

    python examples/training_loop.py [STORE]     # a directory, s3://..., or excp://host:port
"""

import sys

import torch

from excp.client import Checkpointer

target = sys.argv[1] if len(sys.argv) > 1 else "./excp-store"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
data, labels = torch.randn(512, 64), torch.randn(512, 64)

ckpt = Checkpointer(run="example-loop", target=target, every=20)
resumed = ckpt.restore(model, optimizer)  # None on the first run: nothing to resume
start = resumed["step"] if resumed else 0
for step in range(start + 1, start + 101):
    loss = torch.nn.functional.mse_loss(model(data), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ckpt.step(step, model, optimizer, loss=loss.item())  # waits only for a snapshot copy
ckpt.close()  # the last upload finishes; an error that persisted is raised here

s = ckpt.stats
print(f"resumed from step {start}; saved {s.committed} checkpoints, {s.ratio:.1f}x smaller; "
      f"loop stalled {1000 * s.snapshot_s / s.saves:.1f} ms per save; final loss {loss.item():.4f}")
