"""The codec on a GPU: correctness across devices, throughput, time per stage, the
floor, and the training-loop stall of the hook — one script for one device call.

1. Device: name, and the device-to-device bandwidth measured by a 1 GiB copy.
2. Determinism: a synthetic chain coded on the CPU and on the device gives
   byte-identical archives, and each archive decodes to bit-identical tensors on both.
3. A synthetic checkpoint with AdamW state (``--params``, default 1e9), made on the
   device: keyframe and link encode, link decode, in G params/s, with the extra device
   memory the encoder takes (the training job owns the GPU).
4. Stages, on one ``--tensor``-sized weight: residual, v's prediction and codes, m's
   levels, per-position steps, weight codes, the copy of the packed streams to the
   host, zstd there.
5. The floor: bytes the encode and decode must move (inputs read once, outputs written
   once) over the measured bandwidth.
6. A real model (excp's GPT, ``--model-layers`` x ``--model-width``) trained a few
   steps with AdamW on the device: link encode/decode, and the hook's stall per save
   next to one device-to-device copy of the state.

Prints a table last and writes every figure to ``--json``.

    python benchmarks/gpu.py --device cuda --json $OUT/gpu.json
    python benchmarks/gpu.py --device cpu --params 4e6 --tensor 1e6   # what CI runs
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import synthetic  # noqa: E402

from excp import api  # noqa: E402
from excp.bundle import Bundle, Role, TensorEntry  # noqa: E402
from excp.chain import Chain  # noqa: E402
from excp.client import Checkpointer  # noqa: E402
from excp.codec import adam  # noqa: E402
from excp.codec.params import PRESETS  # noqa: E402
from excp.codec.pipeline import _to_host, decode_archive, encode_unit  # noqa: E402
from excp.codec.types import Encoded  # noqa: E402
from excp.format.container import ArchiveReader, ArchiveWriter  # noqa: E402
from excp.store import LocalStore, MemoryStore  # noqa: E402
from excp.workload.corpus import vocab_size  # noqa: E402
from excp.workload.model import GPTConfig, TinyGPT  # noqa: E402
from excp.workload.train import make_optimizer  # noqa: E402

ENCODE_BYTES_PER_PARAM = 4 * 4 + 4
"""fp32 weight, parent reconstruction, m and v read once; the new reconstruction
written once (the packed streams are a few percent on top)."""
DECODE_BYTES_PER_PARAM = 4 + 3 * 4
"""Parent reconstruction read once; weight, m and v written once."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up call, the device idle at both ends."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, repeat=10)


def _on(bundle: Bundle, device: torch.device) -> Bundle:
    moved = Bundle(bundle.layout, extras=dict(bundle.extras), step=bundle.step)
    for entry in bundle.tensors.values():
        moved.add(TensorEntry(entry.name, entry.role, entry.tensor.to(device), entry.param))
    return moved


def determinism(device: torch.device) -> dict[str, object]:
    """A parent and a child coded on the CPU and on ``device``: the same archive bytes;
    each decoded on both devices: the same tensor bits."""
    parent, child = synthetic(4 << 20, 1 << 20, seed=1)
    digests, archives = {}, {}
    for where in ("cpu", str(device)):
        store = MemoryStore()
        chain = Chain(store, "det")
        chain.create(PRESETS["default"].replace(keyframe_every=0), None)
        _, recon = chain.push(_on(parent, torch.device(where)), 100, lambda _: {})
        chain.push(_on(child, torch.device(where)), 200, lambda _, r=recon: r)
        digests[where] = [c.digest for c in chain.commits()]
        archives[where] = [store.get(c.archive) for c in chain.commits()]
    decoded = {}
    for where in ("cpu", str(device)):
        recon, bits = None, []
        for data in archives[str(device)]:
            bundle, recon = decode_archive(ArchiveReader(io.BytesIO(data), len(data), "det"), recon, where)
            bits += [e.tensor.reshape(-1).view(torch.uint8).cpu() for e in bundle.tensors.values()]
        decoded[where] = bits
    same_decode = all(torch.equal(a, b) for a, b in zip(decoded["cpu"], decoded[str(device)], strict=True))
    return {"archives_identical": digests["cpu"] == digests[str(device)], "decodes_identical": same_decode}


def synthetic_chain(params: int, tensor: int, device: torch.device) -> dict[str, float]:
    """Keyframe and link encode, link decode of a synthetic checkpoint on ``device``."""
    parent, child = synthetic(params, tensor, seed=0, device=device)
    n = child.num_parameters()
    chain = Chain(MemoryStore(), "synthetic")
    chain.create(PRESETS["default"].replace(keyframe_every=0), None)
    _sync(device)
    start = time.perf_counter()
    result, recon = chain.push(parent, 100, lambda _: {})
    _sync(device)
    keyframe_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    link, _ = chain.push(child, 200, lambda _, r=recon: r)
    _sync(device)
    encode_s = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated(device) - held if device.type == "cuda" else 0
    decode_s = timed(lambda: chain.read(link.commit, recon, device, weights_only=False), device, repeat=3)
    return {"params": n, "keyframe_encode_s": keyframe_s, "link_encode_s": encode_s,
            "link_decode_s": decode_s,
            "encode_Gparams_s": n / encode_s / 1e9, "decode_Gparams_s": n / decode_s / 1e9,
            "link_ratio": link.commit.ratio, "encoder_extra_device_bytes": extra,
            "archive_bytes": link.commit.size}


def stages(tensor: int, device: torch.device) -> dict[str, float]:
    """Seconds per stage of coding one weight and its moments (the link's path)."""
    parent, child = synthetic(tensor, tensor, seed=2)
    name = next(iter(child.weights())).name
    shape = tuple(child.tensors[name].tensor.shape)
    w = child.tensors[name].tensor.to(device).reshape(-1)
    base = parent.tensors[name].tensor.to(device).reshape(-1)
    m, v = (child.moments(name)[role].tensor.to(device).reshape(-1)
            for role in (Role.EXP_AVG, Role.EXP_AVG_SQ))
    params = PRESETS["default"]
    moments = {Role.EXP_AVG: m, Role.EXP_AVG_SQ: v}
    v_hat = adam._encode_second(Encoded(), "v", v, shape, params.v_step)
    ref = adam._geometric_mean(v_hat)
    grid = adam._grid(v_hat, ref)
    q = adam.weight_step(params, 1e-4, w - base, False)
    _, enc, _ = encode_unit(name, w, base, moments, params, False, 1e-4)
    host, arrived = _to_host(enc.streams)
    if arrived is not None:
        arrived.synchronize()

    def copy_streams() -> None:
        _, event = _to_host(enc.streams)
        if event is not None:
            event.synchronize()

    def zstd() -> None:
        ArchiveWriter(io.BytesIO()).add_unit(name, "adam", [], {}, host)

    return {
        "residual": timed(lambda: w - base, device),
        "v: rank-1 prediction + codes": timed(lambda: adam._encode_second(Encoded(), "v", v, shape,
                                                                         params.v_step), device),
        "m: m/sqrt(v) levels": timed(lambda: adam._encode_first(Encoded(meta={"dither": 1}), m, v_hat,
                                                                params.m_step), device),
        "per-position steps": timed(lambda: adam._grid(v_hat, ref), device),
        "weight codes + reconstruction":
            timed(lambda: adam._encode_weight(Encoded(meta={"dither": 1}), w - base, q, grid), device),
        "whole unit (encode_unit)": timed(lambda: encode_unit(name, w, base, moments, params, False, 1e-4),
                                          device),
        "packed streams to host": timed(copy_streams, device),
        "zstd on the host": timed(zstd, device),
    }


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, device: torch.device) -> None:
    tokens = torch.randint(0, model.config.vocab_size, (8, model.config.block_size + 1), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def real_model(layers: int, width: int, device: torch.device) -> dict[str, float]:
    """excp's GPT trained on ``device``: link encode/decode, and the hook's stall."""
    config = GPTConfig(vocab_size(), block_size=128, n_layer=layers, n_head=max(1, width // 64), n_embd=width)
    torch.manual_seed(0)
    model = TinyGPT.from_config(config).to(device)
    opt = make_optimizer(model)
    _train(model, opt, 5, device)
    chain = Chain(MemoryStore(), "gpt")
    chain.create(PRESETS["default"].replace(keyframe_every=0), None)
    _, recon = chain.push(api.to_bundle({"model": model.state_dict(), "optimizer": opt.state_dict()}), 5,
                          lambda _: {})
    _train(model, opt, 20, device)
    bundle = api.to_bundle({"model": model.state_dict(), "optimizer": opt.state_dict()})
    n = bundle.num_parameters()
    _sync(device)
    start = time.perf_counter()
    link, _ = chain.push(bundle, 25, lambda _, r=recon: r)
    _sync(device)
    encode_s = time.perf_counter() - start
    decode_s = timed(lambda: chain.read(link.commit, recon, device, weights_only=False), device, repeat=3)
    state = [t for t in [*model.state_dict().values(), *(
        s for per in opt.state.values() for s in per.values())] if isinstance(t, torch.Tensor)]
    copy_s = timed(lambda: [t.clone() for t in state], device)
    with tempfile.TemporaryDirectory() as root:
        hook = Checkpointer("gpt", LocalStore(root), every=1)
        stalls = []
        for step in range(1, 6):
            _train(model, opt, 1, device)
            _sync(device)
            start = time.perf_counter()
            hook.step(step, model, opt)
            _sync(device)
            stalls.append(time.perf_counter() - start)
            hook.wait()
        hook.close()
    return {"params": n, "link_encode_s": encode_s, "link_decode_s": decode_s,
            "encode_Gparams_s": n / encode_s / 1e9, "decode_Gparams_s": n / decode_s / 1e9,
            "link_ratio": link.commit.ratio, "hook_stall_s": statistics.median(stalls[1:]),
            "state_copy_s": copy_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--tensor", type=float, default=16e6)
    parser.add_argument("--model-layers", type=int, default=12)
    parser.add_argument("--model-width", type=int, default=768)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bandwidth_GBs": bandwidth(device) / 1e9,
        "determinism": determinism(device),
        "synthetic": synthetic_chain(int(args.params), int(args.tensor), device),
        "stages_s": stages(int(args.tensor), device),
        "model": real_model(args.model_layers, args.model_width, device),
    }
    band = figures["bandwidth_GBs"] * 1e9
    n = figures["synthetic"]["params"]
    figures["floor_s"] = {"encode": n * ENCODE_BYTES_PER_PARAM / band,
                          "decode": n * DECODE_BYTES_PER_PARAM / band}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    syn, model = figures["synthetic"], figures["model"]
    print(f"device {figures['device']}, copy bandwidth {figures['bandwidth_GBs']:.0f} GB/s, "
          f"determinism {figures['determinism']}")
    print(f"{'synthetic, ' + format(n / 1e6, '.0f') + 'M params':<44} encode {syn['encode_Gparams_s']:7.3f} "
          f"G params/s (floor {n / figures['floor_s']['encode'] / 1e9:.1f}), decode "
          f"{syn['decode_Gparams_s']:7.3f} (floor {n / figures['floor_s']['decode'] / 1e9:.1f}), "
          f"ratio {syn['link_ratio']:.1f}x, "
          f"encoder extra {syn['encoder_extra_device_bytes'] / 2**20:.0f} MiB")
    for stage, seconds in figures["stages_s"].items():
        print(f"  {stage:<42} {seconds * 1e3:9.2f} ms")
    print(f"{'GPT, ' + format(model['params'] / 1e6, '.1f') + 'M params':<44} encode "
          f"{model['encode_Gparams_s']:7.3f} G params/s, decode {model['decode_Gparams_s']:7.3f}, "
          f"ratio {model['link_ratio']:.1f}x, hook stall {model['hook_stall_s'] * 1e3:.1f} ms "
          f"vs state copy {model['state_copy_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
