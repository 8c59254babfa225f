"""Train a tiny GPT-2 with the Hugging Face Trainer, keep its checkpoints in excp, resume.

    pip install -e ".[hf]"    # in the excp checkout
    python examples/hf_trainer.py [STORE]

STORE: a directory, a store URL (s3://...) or a service (excp://HOST:PORT);
default: a new temporary directory.
"""

import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import excp.client
from excp.client.hf import ExcpTrainerCallback

store = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="excp-store-")
work = tempfile.mkdtemp(prefix="excp-example-")
torch.manual_seed(0)
tokens = torch.randint(0, 64, (64, 16))
data = [{"input_ids": t, "labels": t} for t in tokens]


def make_trainer(max_steps: int, output_dir: str, callback: ExcpTrainerCallback) -> Trainer:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, save_steps=4, save_total_limit=1,
                             per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="constant",
                             logging_steps=4, use_cpu=True, report_to=[], disable_tqdm=True)
    return Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data, callbacks=[callback])


# The first job: 12 steps; the callback pushes checkpoint-4, -8 and -12 as the Trainer saves them.
callback = ExcpTrainerCallback("gpt-tiny", store)
make_trainer(12, f"{work}/job1", callback).train()
callback.close()
stats = callback.checkpointer.stats
print(f"stored {stats.committed} checkpoints in {store}: {stats.raw_bytes:,} bytes -> "
      f"{stats.stored_bytes:,} ({stats.ratio:.1f}x)")

# The next job (after a preemption, say): restore step 12 as a Trainer directory, train on to 20.
excp.client.restore("gpt-tiny", 12, out=f"{work}/restored", target=store)
callback = ExcpTrainerCallback("gpt-tiny", store)
trainer = make_trainer(20, f"{work}/job2", callback)
result = trainer.train(resume_from_checkpoint=f"{work}/restored")
callback.close()
print(f"resumed from step 12 to step {trainer.state.global_step}: training loss {result.training_loss:.3f}; "
      f"the run has steps {[c.step for c in excp.client.open_target(store).commits('gpt-tiny')]}")
