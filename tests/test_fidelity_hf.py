"""The Hugging Face fine-tuning regime of the fidelity benchmark, on a tiny BERT made
here (the benchmark's own model, all-MiniLM-L6-v2, is a bench extra): the Trainer
saves directories, excp pushes and restores them, the Trainer resumes from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from excp.bench import fidelity_hf
from excp.bench.fidelity import HORIZON
from excp.codec.params import PRESETS
from excp.workload.corpus import make_corpus


def _tiny_bert(root: Path) -> str:
    words = sorted({w.strip(".,?!()'").lower() for w in make_corpus(200_000, 1).split()} - {""})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=len(fidelity_hf.CLASSES))
    transformers.set_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.mark.slow
def test_the_trainer_resumes_from_excp_in_both_protocols(tmp_path: Path) -> None:
    regime = fidelity_hf.HFRegime(name="tiny BERT", lr=1e-3, every=20, steps=20 + HORIZON, phases=(20,),
                                  model_dir=_tiny_bert(tmp_path))
    result = fidelity_hf.run_hf_regime(regime, {"default": PRESETS["default"]}, lambda line: None)
    figures = result["presets"]["default"]
    closed = figures["closed_loop"]
    assert sorted(closed["eval_delta_pct"]) == list(range(20, regime.steps + 1, 20))
    assert closed["ratio"] > 3
    once = figures["resume_once"]["phases"][20]
    assert len(once["step_delta_pct"]) == HORIZON
    assert abs(once["eval_delta_pct"]) < 5  # resumed from the reconstruction, training went on normally
    assert once["max_abs_step_delta_pct"] > 0  # and it really ran from the reconstruction, not the original
