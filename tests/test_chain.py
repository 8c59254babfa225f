"""Chains through the Python API on a local store: closed loop, keyframes, base from a
seed, idempotent pushes, conflicts, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from excp import api
from excp.chain import Chain, encode_archive
from excp.codec import adam
from excp.codec.params import PRESETS, CodecParams
from excp.errors import ChainMismatch, Conflict, CorruptData, InvalidInput, NotFound
from excp.store import open_store


def _weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["model"].items() if v.is_floating_point()}


def _relative_error(restored: torch.Tensor, original: torch.Tensor) -> float:
    return float((restored.float() - original.float()).norm() / original.float().norm())


def _max_error(restored: dict, original: dict) -> float:
    return max(float((restored["model"][k].float() - v.float()).abs().max())
               for k, v in _weights(original).items())


def test_closed_loop_error_does_not_accumulate_over_24_links(tmp_path, tiny_run) -> None:
    """Closed loop: every link's error stays one quantization step; open loop grows."""
    run, store = tiny_run(), str(tmp_path / "store")
    params = CodecParams(keyframe_every=0)
    errors, recon = [], None
    for i in range(25):
        ckpt = run.advance(10)
        result, recon = api.push(ckpt, "closed", store=store, params=params if i == 0 else None)
        assert result.created
        restored = api.load_dict(api.restore("closed", ckpt["step"], store=store))
        errors.append(_max_error(restored, ckpt))
        for name, tensor in recon.items():
            assert torch.equal(tensor, restored["model"][name]), "encoder and decoder disagree"
    head = api.list_commits("closed", store)[-1]
    assert head.depth == 24 and not head.keyframe
    assert max(errors[12:]) <= 2.5 * max(errors[1:12]), errors


def test_keyframes_bound_the_walk_and_count_in_the_ratio(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), str(tmp_path / "s")
    for i in range(7):
        api.push(run.advance(5), "k", store=store, params=CodecParams(keyframe_every=3) if i == 0 else None)
    commits = api.list_commits("k", store)
    assert [c.keyframe for c in commits] == [True, False, False, True, False, False, True]
    assert [c.depth for c in commits] == [0, 1, 2, 0, 1, 2, 0]
    chain = Chain(open_store(store), "k")
    assert [c.step for c in chain.path_to(commits[5].step)] == [c.step for c in commits[3:6]]
    keyframe_sizes = [c.size for c in commits if c.keyframe]
    link_sizes = [c.size for c in commits if not c.keyframe]
    assert min(keyframe_sizes) > max(link_sizes)


def test_everything_but_weights_and_moments_comes_back_bit_exact(tmp_path, tiny_run) -> None:
    run = tiny_run(amsgrad=True)
    run.advance(3)
    ckpt = run.advance(3)
    ckpt["rng"] = torch.get_rng_state()
    ckpt["counts"] = torch.arange(10, dtype=torch.int64)
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    api.push(path, "exact", store=str(tmp_path / "s"))
    out = tmp_path / "out.pt"
    api.restore("exact", "latest", out, store=str(tmp_path / "s"))
    restored = torch.load(out, weights_only=True)
    assert restored["step"] == ckpt["step"] and restored["meta"] == ckpt["meta"]
    assert torch.equal(restored["rng"], ckpt["rng"]) and torch.equal(restored["counts"], ckpt["counts"])
    assert restored["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]
    for index, state in ckpt["optimizer"]["state"].items():
        got = restored["optimizer"]["state"][index]
        assert torch.equal(got["step"], state["step"])
        assert set(got) == set(state)  # amsgrad's max_exp_avg_sq survives
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert got[key].dtype == state[key].dtype and got[key].shape == state[key].shape
            assert not bool(((got["exp_avg"] != 0) & (got["exp_avg_sq"] == 0)).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_chains(tmp_path, tiny_run, dtype) -> None:
    """Each dtype restores in its own dtype, every weight within half of its coarsest
    step (q·2^COARSER, q = lr_step·lr) of the original, plus the dtype's rounding."""
    run, store = tiny_run(dtype=dtype, eps=1e-4), str(tmp_path / "s")
    for _ in range(3):
        ckpt = run.advance(4)
        api.push(ckpt, "half", store=store)
    restored = api.load_dict(api.restore("half", "latest", store=store))
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    bound = 0.5 * PRESETS["default"].lr_step * lr * 2**adam.COARSER
    for name, tensor in _weights(ckpt).items():
        got = restored["model"][name]
        assert got.dtype == dtype
        error = (got.float() - tensor.float()).abs()
        assert bool((error <= bound + tensor.float().abs() * torch.finfo(dtype).eps).all()), name


def test_lossless_mode_is_bit_exact(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), str(tmp_path / "s")
    ckpts = [run.advance(4) for _ in range(3)]
    ckpts = [{k: (v if not isinstance(v, dict) else v) for k, v in c.items()} for c in ckpts]
    for i, ckpt in enumerate(ckpts):
        torch.save(ckpt, tmp_path / f"{i}.pt")
        api.push(tmp_path / f"{i}.pt", "ll", store=store,
                 params=CodecParams(mode="lossless") if i == 0 else None)
    for i in range(3):
        original = torch.load(tmp_path / f"{i}.pt", weights_only=True)
        restored = api.load_dict(api.restore("ll", original["step"], store=store))
        for name, tensor in original["model"].items():
            assert torch.equal(restored["model"][name], tensor)
        for index, state in original["optimizer"]["state"].items():
            for key, tensor in state.items():
                assert torch.equal(restored["optimizer"]["state"][index][key], tensor)


def test_repush_is_noop_and_conflicts_are_errors(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), str(tmp_path / "s")
    first = run.advance(5)
    torch.save(first, tmp_path / "a.pt")
    api.push(tmp_path / "a.pt", "r", store=store)
    again, _ = api.push(tmp_path / "a.pt", "r", store=store)
    assert not again.created and len(api.list_commits("r", store)) == 1
    later = run.advance(5)
    api.push(later, "r", store=store)
    with pytest.raises(Conflict, match="different checkpoint at step 5"):
        api.push(run.advance(1), "r", step=5, store=store)
    with pytest.raises(Conflict, match="not after the head"):
        api.push(run.advance(1), "r", step=7, store=store)


def test_base_rebuilt_from_seed(tmp_path) -> None:
    from tests.factories import mlp

    base = api.BaseSpec(seed=3, factory="tests.factories:mlp")
    model = mlp(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    store = str(tmp_path / "s")
    for step in (10, 20):
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
        api.push({"model": model.state_dict(), "optimizer": opt.state_dict()}, "seeded",
                 step=step, store=store, base=base)
    first = api.list_commits("seeded", store)[0]
    assert not first.keyframe and first.parent is None
    with pytest.raises(InvalidInput, match="--init-seed 3 --model-factory tests.factories:mlp"):
        api.restore("seeded", 20, store=store)
    with pytest.raises(ChainMismatch, match="do not match"):
        api.restore("seeded", 20, store=store, base=api.BaseSpec(4, "tests.factories:mlp"))
    restored = api.load_dict(api.restore("seeded", 20, store=store, base=base))
    initial = mlp(3).state_dict()
    assert torch.equal(restored["model"].pop("scale"), initial.pop("scale"))  # a buffer: exact
    bound = 0.5 * PRESETS["default"].lr_step * 1e-2 * 2**adam.COARSER  # half the coarsest weight step
    for name in initial:
        error = (restored["model"][name] - model.state_dict()[name]).abs().max()
        assert 0 < float(error) <= bound, name


def test_shape_change_mid_chain_is_an_error(tmp_path) -> None:
    store = str(tmp_path / "s")
    torch.save({"w": torch.randn(8, 4), "b": torch.randn(4)}, tmp_path / "a.pt")
    torch.save({"w": torch.randn(9, 4), "b": torch.randn(4)}, tmp_path / "b.pt")
    api.push(tmp_path / "a.pt", "shape", step=1, store=store)
    with pytest.raises(ChainMismatch, match="'w' is torch.float32 \\(9, 4\\)"):
        api.push(tmp_path / "b.pt", "shape", step=2, store=store)


def test_nan_is_refused_with_the_tensor_name(tmp_path, tiny_run) -> None:
    ckpt = tiny_run().advance(2)
    ckpt["model"]["3.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="3.weight.*NaN"):
        api.push(ckpt, "nan", store=str(tmp_path / "s"))


def test_missing_link_and_corrupt_archive_name_the_step(tmp_path, tiny_run) -> None:
    run, store_url = tiny_run(), str(tmp_path / "s")
    for _ in range(3):
        api.push(run.advance(2), "c", store=store_url)
    store = open_store(store_url)
    commits = api.list_commits("c", store_url)
    data = bytearray(store.get(commits[2].archive))
    data[40] ^= 0xFF
    store.put(commits[2].archive, bytes(data))
    with pytest.raises(CorruptData, match="step 6"):
        api.restore("c", 6, store=store_url)
    with pytest.raises(CorruptData, match="step 6"):
        api.verify("c", store=store_url)
    store.delete(f"runs/c/commits/{commits[1].step:012d}.json")
    with pytest.raises(CorruptData, match="step 6 needs step 4"):
        api.restore("c", 6, store=store_url)
    with pytest.raises(NotFound):
        api.restore("c", 99, store=store_url)


def test_restore_on_truncated_commit_record(tmp_path, tiny_run) -> None:
    store_url = str(tmp_path / "s")
    api.push(tiny_run().advance(2), "t", store=store_url)
    store = open_store(store_url)
    key = "runs/t/commits/000000000002.json"
    store.put(key, store.get(key)[:20])
    with pytest.raises(CorruptData, match="commit record"):
        api.restore("t", 2, store=store_url)


def test_invalid_run_names_and_options(tmp_path, tiny_run) -> None:
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200, "nul\0"):
        with pytest.raises(InvalidInput, match="run name"):
            api.push(tiny_run().advance(1), bad, store=str(tmp_path / "s"))
    with pytest.raises(InvalidInput, match="weight_bits"):
        CodecParams(weight_bits=0)


def _byte_plane_zstd(tensor: torch.Tensor) -> int:
    """ZipNN-style lossless baseline: byte planes of the tensor, zstd level 3."""
    import zstandard

    raw = tensor.contiguous().view(-1).view(torch.uint8).view(-1, tensor.element_size())
    return sum(len(zstandard.ZstdCompressor(level=3).compress(raw[:, i].contiguous().numpy().tobytes()))
               for i in range(tensor.element_size()))


def test_lossless_chain_stores_less_than_byte_plane_zstd(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), str(tmp_path / "s")
    baseline = 0
    for i in range(4):
        ckpt = run.advance(2)
        api.push(ckpt, "ll", store=store, params=CodecParams(mode="lossless") if i == 0 else None)
        tensors = [t for t in ckpt["model"].values()]
        tensors += [t for state in ckpt["optimizer"]["state"].values()
                    for key, t in state.items() if key != "step"]
        baseline += sum(_byte_plane_zstd(t) for t in tensors)
    stored = sum(c.size for c in api.list_commits("ll", store))
    assert stored < baseline, (stored, baseline)


def test_presets_trade_ratio_for_fidelity(tmp_path, tiny_run) -> None:
    """On the same checkpoints: safe stores the most of the Adam-budget presets, max the
    least, and their restore errors run the other way."""
    ckpts = []
    run = tiny_run()
    for _ in range(4):
        ckpts.append({k: (v if k != "model" else {n: t.clone() for n, t in v.items()})
                      for k, v in run.advance(5).items()})
    stored, errors = {}, {}
    for name in ("safe", "default", "max"):
        store = str(tmp_path / name)
        for i, ckpt in enumerate(ckpts):
            api.push(ckpt, name, store=store, params=PRESETS[name] if i == 0 else None)
        stored[name] = sum(c.size for c in api.list_commits(name, store))
        restored = api.load_dict(api.restore(name, "latest", store=store))
        errors[name] = _max_error(restored, ckpts[-1])
    assert stored["safe"] > stored["default"] > stored["max"], stored
    assert errors["safe"] < errors["default"] < errors["max"], errors


def test_base_options_must_match_the_run(tmp_path, tiny_run) -> None:
    store = str(tmp_path / "s")
    api.push(tiny_run().advance(2), "nobase", store=store)
    with pytest.raises(InvalidInput, match="created without a seed base"):
        api.push(tiny_run().advance(4), "nobase", store=store,
                 base=api.BaseSpec(0, "tests.factories:mlp"))


def _coded_elsewhere(chain: Chain, ckpt: dict, step: int, recon: dict | None,
                     params: CodecParams | None = None, run: str | None = None) -> io.BytesIO:
    """An archive coded the way a training node does it: from the head's record and its
    reconstruction only, without the store."""
    out = io.BytesIO()
    encode_archive(run or chain.run, params or chain.params(), chain.head(), api.to_bundle(ckpt), step,
                   out, lambda head: recon)
    return out


def test_an_archive_coded_elsewhere_commits_like_a_push(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), open_store(str(tmp_path / "s"))
    first = copy.deepcopy(run.advance(5))  # advance() hands out the live tensors
    _, recon = api.push(first, "r", store=store)
    chain = Chain(store, "r")
    second = run.advance(5)
    upload = _coded_elsewhere(chain, second, 10, recon)
    result = chain.commit_archive(upload)
    assert result.created and result.commit.parent == 5 and result.commit.depth == 1
    assert result.commit.size == len(upload.getvalue())
    assert result.commit.num_parameters == api.to_bundle(second).num_parameters()
    pushed_elsewhere = api.load_dict(api.restore("r", 10, store=store))
    api.push(first, "twin", store=store)
    api.push(second, "twin", store=store)
    pushed_here = api.load_dict(api.restore("twin", 10, store=store))
    for name, tensor in pushed_here["model"].items():
        assert torch.equal(pushed_elsewhere["model"][name], tensor), name
    assert not chain.commit_archive(upload).created  # the same upload again: a no-op


def test_uploads_that_cannot_be_committed(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), open_store(str(tmp_path / "s"))
    _, recon = api.push(run.advance(5), "r", store=store)
    chain = Chain(store, "r")
    stale = _coded_elsewhere(chain, run.advance(5), 20, recon)
    api.push(run.advance(5), "r", step=15, store=store)
    with pytest.raises(Conflict, match="coded against step 5, but the run's head is 15"):
        chain.commit_archive(stale)
    with pytest.raises(InvalidInput, match="coded for run 'other'"):
        chain.commit_archive(_coded_elsewhere(chain, run.advance(5), 20, recon, run="other"))
    with pytest.raises(ChainMismatch, match="codec parameters differ"):
        chain.commit_archive(_coded_elsewhere(chain, run.advance(5), 20, recon, params=PRESETS["max"]))
    flipped = bytearray(_coded_elsewhere(chain, run.advance(5), 20, recon).getvalue())
    flipped[len(flipped) // 3] ^= 0x40
    before = store.list("runs/r/")
    with pytest.raises(CorruptData):
        chain.commit_archive(io.BytesIO(bytes(flipped)))
    assert store.list("runs/r/") == before, "a refused upload must leave nothing behind"
    assert [c.step for c in api.list_commits("r", store)] == [5, 15]


def test_delete_keeps_every_remaining_step_restorable(tmp_path, tiny_run) -> None:
    """Only a step no restore goes through may go: the head, or a step before a keyframe."""
    run, store = tiny_run(), open_store(str(tmp_path / "s"))
    params = CodecParams(keyframe_every=2)  # steps 5 K, 10 link, 15 K, 20 link
    for step in (5, 10, 15, 20):
        api.push(run.advance(5), "r", step=step, store=store, params=params)
    chain = Chain(store, "r")
    assert [c.keyframe for c in chain.commits()] == [True, False, True, False]
    before = {s: api.load_dict(api.restore("r", s, store=store)) for s in (5, 15)}
    with pytest.raises(Conflict, match="step 15 is needed to restore steps 20"):
        chain.delete(15)
    with pytest.raises(Conflict, match="step 5 is needed to restore steps 10"):
        chain.delete(5)
    assert chain.delete(20).step == 20  # the head
    assert chain.delete(10).step == 10  # its next checkpoint (15) is a keyframe
    with pytest.raises(NotFound):
        chain.delete(10)
    assert [c.step for c in chain.commits()] == [5, 15]
    assert not any("/000000000010-" in k or "/000000000020-" in k for k in store.list("runs/r/"))
    for step, state in before.items():
        restored = api.load_dict(api.restore("r", step, store=store))
        for name, tensor in state["model"].items():
            assert torch.equal(restored["model"][name], tensor), (step, name)
    result, _ = api.push(run.advance(5), "r", step=25, store=store)
    assert result.commit.parent == 15
    assert api.verify("r", store=store).checkpoints == 3


def test_dependants_run_to_the_next_keyframe(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), open_store(str(tmp_path / "s"))
    for step in (1, 2, 3, 4):
        api.push(run.advance(2), "r", step=step, store=store, params=CodecParams(keyframe_every=3))
    chain = Chain(store, "r")
    assert chain.dependants(1) == [2, 3] and chain.dependants(3) == [] and chain.dependants(4) == []


def test_delete_run_removes_only_that_run(tmp_path, tiny_run) -> None:
    run, store = tiny_run(), open_store(str(tmp_path / "s"))
    for step in (1, 2, 3):
        api.push(run.advance(2), "gone", step=step, store=store)
    api.push(run.advance(2), "kept", step=1, store=store)
    assert Chain(store, "gone").delete_run() == 3
    assert store.list("runs/gone/") == []
    assert api.list_runs(store) == ["kept"]
    assert [c.step for c in api.list_commits("kept", store)] == [1]
    with pytest.raises(NotFound):
        Chain(store, "gone").delete_run()
