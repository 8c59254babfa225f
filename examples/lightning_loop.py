"""Train a tiny model with PyTorch Lightning, keep its checkpoints in excp, resume.

    pip install -e ".[lightning]"    # in the excp checkout
    python examples/lightning_loop.py [STORE]

STORE: a directory, a store URL (s3://...) or a service (excp://HOST:PORT);
default: a new temporary directory.
"""

import sys
import tempfile

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import excp.client
from excp.client.lightning import ExcpLightningCallback

store = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="excp-store-")
work = tempfile.mkdtemp(prefix="excp-example-")
torch.manual_seed(0)
x = torch.randn(256, 16)
y = torch.sin(x @ torch.randn(16, 1))
data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def make_trainer(max_steps: int, callback: ExcpLightningCallback) -> pl.Trainer:
    saver = ModelCheckpoint(dirpath=f"{work}/checkpoints", every_n_train_steps=8, save_top_k=-1)
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[saver, callback])


# The first job: 24 steps; the callback pushes every checkpoint ModelCheckpoint saves (8, 16, 24).
callback = ExcpLightningCallback("mlp-tiny", store)
make_trainer(24, callback).fit(Regressor(), data)
stats = callback.checkpointer.stats
print(f"stored {stats.committed} checkpoints in {store}: {stats.raw_bytes:,} bytes -> "
      f"{stats.stored_bytes:,} ({stats.ratio:.1f}x)")

# The next job (after a preemption, say): restore step 24 as a .ckpt file, train on to 40.
excp.client.restore("mlp-tiny", 24, out=f"{work}/resume.ckpt", target=store)
callback = ExcpLightningCallback("mlp-tiny", store)
trainer = make_trainer(40, callback)
trainer.fit(Regressor(), data, ckpt_path=f"{work}/resume.ckpt")
print(f"resumed from step 24 to step {trainer.global_step}: loss {trainer.callback_metrics['loss']:.4f}; "
      f"the run has steps {[c.step for c in excp.client.open_target(store).commits('mlp-tiny')]}")
