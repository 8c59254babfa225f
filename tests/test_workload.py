"""The training workload must be deterministic and exactly resumable, or a difference
between a compressed and an uncompressed run could not be blamed on compression."""

from __future__ import annotations

import io
import math

import pytest
import torch

from excp.errors import InvalidInput
from excp.workload.corpus import VOCAB, decode, encode, make_corpus, vocab_size
from excp.workload.model import PRESETS, make_model, small_model, tiny_model
from excp.workload.train import TrainConfig, Trainer, make_optimizer, run_chain

# Small batches and a short corpus keep the tests fast; determinism does not depend on size.
FAST = TrainConfig(batch_size=4, corpus_chars=200_000, eval_windows=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two intra-op threads crawl when other processes compete for the two cores; one
    thread is barely slower on an idle machine and steady on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_corpus_is_deterministic_and_seed_dependent() -> None:
    text = make_corpus(20_000, seed=0)
    assert len(text) == 20_000
    assert make_corpus(20_000, seed=0) == text
    assert make_corpus(20_000, seed=1) != text
    assert make_corpus(5_000, seed=0) == text[:5_000]
    assert set(text) <= set(VOCAB)
    assert len(set(text.split())) > 300


def test_tokenizer_round_trips_and_rejects_foreign_characters() -> None:
    text = make_corpus(2_000, seed=3)
    ids = encode(text)
    assert decode(ids) == text
    assert max(ids) < vocab_size() == len(VOCAB)
    with pytest.raises(ValueError, match="vocabulary"):
        encode("caf\u00e9")


def test_model_factory_is_bit_identical_per_seed_and_leaves_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = tiny_model(7), tiny_model(7), tiny_model(8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    _assert_same_tensors(a.state_dict(), b.state_dict())
    assert not torch.equal(a.state_dict()["tok_emb.weight"], c.state_dict()["tok_emb.weight"])


def test_preset_sizes() -> None:
    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert 300_000 < count(tiny_model(0)) < 500_000
    assert 2_500_000 < count(small_model(0)) < 3_500_000
    assert set(PRESETS) >= {"tiny", "small"}


def test_forward_shape_and_tied_output_projection() -> None:
    model = make_model("tiny", 0)
    config = model.config
    logits = model(torch.zeros(2, config.block_size, dtype=torch.long))
    assert logits.shape == (2, config.block_size, config.vocab_size)
    assert not any("lm_head" in key for key in model.state_dict())


def test_optimizer_groups_skip_decay_on_vectors_and_record_names() -> None:
    model = make_model("tiny", 0)
    groups = make_optimizer(model).state_dict()["param_groups"]
    decayed = {name for g in groups if g["weight_decay"] > 0 for name in g["param_names"]}
    plain = {name for g in groups if g["weight_decay"] == 0 for name in g["param_names"]}
    assert "tok_emb.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert "blocks.0.ln1.weight" in plain and "blocks.0.attn.qkv.bias" in plain
    assert decayed | plain == set(model.state_dict())


def test_tiny_model_learns() -> None:
    trainer = Trainer("tiny", seed=0, total_steps=100, train=FAST)
    before = trainer.eval_loss()
    trainer.train_steps(100)
    after = trainer.eval_loss()
    assert before == pytest.approx(math.log(vocab_size()), abs=0.2)
    assert after < before - 1.0


def test_resume_from_saved_checkpoint_is_bit_identical() -> None:
    straight = Trainer("tiny", seed=5, total_steps=200, train=FAST)
    straight.train_steps(200)

    first = Trainer("tiny", seed=5, total_steps=200, train=FAST)
    first.train_steps(100)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = Trainer("tiny", seed=99, total_steps=10, train=FAST)
    resumed.load_state_dict(checkpoint)
    resumed.train_steps(100)

    assert resumed.step == straight.step == 200
    _assert_same_tensors(resumed.model.state_dict(), straight.model.state_dict())
    expected = straight.optimizer.state_dict()["state"]
    actual = resumed.optimizer.state_dict()["state"]
    assert actual.keys() == expected.keys()
    for index in expected:
        _assert_same_tensors(actual[index], expected[index])
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_load_state_dict_rejects_partial_checkpoints() -> None:
    trainer = Trainer("tiny", seed=0, train=FAST)
    state = trainer.state_dict()
    del state["optimizer"]
    with pytest.raises(InvalidInput, match="optimizer"):
        trainer.load_state_dict(state)


def test_run_chain_checkpoints_and_closed_loop_restore() -> None:
    calls: list[int] = []

    def observe(step: int, state: dict) -> None:
        calls.append(step)
        assert state["step"] == step
        # Mutating the handed-over copy must not leak into training.
        for tensor in state["model"].values():
            tensor.zero_()

    baseline = run_chain("tiny", steps=120, every=50, seed=1, train=FAST)
    observed = run_chain("tiny", steps=120, every=50, seed=1, on_checkpoint=observe, train=FAST)
    assert calls == [50, 100]
    assert [step for step, _ in baseline.curve] == [0, 50, 100, 120]
    assert observed.curve == baseline.curve
    assert baseline.final_loss == baseline.curve[-1][1] < baseline.curve[0][1]

    def zero_weights(step: int, state: dict) -> dict:
        for tensor in state["model"].values():
            tensor.zero_()
        return state

    zeroed = run_chain("tiny", steps=50, every=50, seed=1, on_checkpoint=zero_weights, train=FAST)
    # All-zero weights give uniform logits, so the restored model scores log(V) exactly.
    assert zeroed.final_loss == pytest.approx(math.log(vocab_size()), abs=1e-5)
    assert zeroed.final_loss > baseline.curve[1][1] + 0.5


def test_run_chain_rejects_a_restore_from_another_step() -> None:
    def rewind(step: int, state: dict) -> dict:
        return {**state, "step": step - 1}

    with pytest.raises(InvalidInput, match="expected step 10"):
        run_chain("tiny", steps=10, every=10, seed=0, on_checkpoint=rewind, train=FAST)
