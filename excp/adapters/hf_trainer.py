"""A Hugging Face Trainer checkpoint directory (``checkpoint-500/``).

The weights (``model.safetensors``, ``pytorch_model.bin``, or their shards named by an
``*.index.json``) and ``optimizer.pt`` become tensors; every other file
(``scheduler.pt``, ``trainer_state.json``, ``rng_state*.pth``, configs, tokenizer
files, ``training_args.bin``, subdirectories) is kept byte for byte as the extra
``hf/<relative path>`` and is never unpickled. Safetensors header metadata is kept in
the ``hf_trainer/safetensors_metadata`` extra.

Pairing the Trainer's optimizer needs the model's parameter order, and safetensors
files do not keep it (their keys are sorted). It comes, in this order of preference,
from ``param_names`` in ``optimizer.pt``, from the caller (``param_order``), from the
model class named in ``config.json`` instantiated on the meta device when transformers
is installed (built-in classes only, never remote code), or from ``pytorch_model.bin``
files, which keep state-dict order. Without any of these excp refuses to guess.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from excp.adapters import assemble
from excp.adapters.files import load_safetensors, load_torch, not_a_checkpoint, save_torch, staged_dir
from excp.adapters.state_dict import save_safetensors
from excp.bundle import Bundle
from excp.errors import CorruptData

LAYOUT = "hf_trainer"
SAFETENSORS_METADATA = f"{LAYOUT}/safetensors_metadata"
FILE_PREFIX = "hf/"
OPTIMIZER_FILE = "optimizer.pt"
# In the order transformers itself prefers when a directory has several.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FIX = (
    "pass param_order=[n for n, _ in model.named_parameters()] to load_checkpoint, or "
    "install transformers so excp can read the parameter order from config.json"
)


def is_trainer_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHT_FILES)


def load(path: Path, *, param_order: Sequence[str] | None = None) -> Bundle:
    weight_files = _weight_files(path)
    weights: dict[str, dict] = {}
    metadata: dict[str, dict[str, str]] = {}
    for name in weight_files:
        if name.endswith(".safetensors"):
            weights[name], metadata[name] = _safetensors(path / name)
        else:
            weights[name] = _torch_state_dict(path / name)
    obj: dict = {"weights": weights}
    optimizers = []
    if (path / OPTIMIZER_FILE).is_file():
        obj["optimizer"] = load_torch(path / OPTIMIZER_FILE)
        optimizers.append(("optimizer",))
    order = _parameter_order(path, obj, param_order)
    bundle = assemble.to_bundle(
        LAYOUT, obj, [("weights", n) for n in weight_files], optimizers, order=order, fix=FIX
    )
    bundle.extras[SAFETENSORS_METADATA] = json.dumps(metadata).encode()
    tensor_files = {*weight_files, OPTIMIZER_FILE}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative not in tensor_files:
            bundle.extras[FILE_PREFIX + relative] = file.read_bytes()
    bundle.step = _global_step(bundle.extras.get(FILE_PREFIX + "trainer_state.json"))
    return bundle


def _global_step(trainer_state: bytes | None) -> int | None:
    """The Trainer's ``global_step``: the step this checkpoint directory was saved at."""
    try:
        step = json.loads(trainer_state)["global_step"] if trainer_state else None
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None


def save(bundle: Bundle, out: Path) -> Path:
    """Write the directory: same file names, other files byte for byte, tensors on the CPU."""
    obj = assemble.from_bundle(bundle, LAYOUT, convert=lambda t: t.cpu())
    metadata = json.loads(bundle.extras.get(SAFETENSORS_METADATA, b"{}"))
    with staged_dir(out) as tmp:
        for name, state in obj["weights"].items():
            if name.endswith(".safetensors"):
                save_safetensors(state, _inside(tmp, name), metadata.get(name) or {})
            else:
                save_torch(state, _inside(tmp, name))
        if "optimizer" in obj:
            save_torch(obj["optimizer"], tmp / OPTIMIZER_FILE)
        for key, data in bundle.extras.items():
            if key.startswith(FILE_PREFIX):
                _inside(tmp, key[len(FILE_PREFIX) :]).write_bytes(data)
    return out


def _inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing names that would escape ``root`` (bundles are data)."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or ".." in parts:
        raise CorruptData(f"file name {relative!r} in the bundle points outside the checkpoint")
    target = root.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _weight_files(path: Path) -> list[str]:
    for name in WEIGHT_FILES:
        if not (path / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return [name]
        try:
            shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise not_a_checkpoint(path / name, f"not a weight index ({exc})") from exc
        for shard in shards:
            parts = PurePosixPath(shard).parts
            if len(parts) != 1 or shard in ("..", ".") or not (path / shard).is_file():
                raise not_a_checkpoint(path, f"{name} names a missing shard {shard!r}")
        return shards
    raise not_a_checkpoint(path, "no model.safetensors or pytorch_model.bin in the directory")


def _safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    tensors, metadata = load_safetensors(path)
    return tensors, metadata or {}


def _torch_state_dict(path: Path) -> dict:
    state = load_torch(path)
    if not isinstance(state, dict):
        raise not_a_checkpoint(path, f"it holds a {type(state).__name__}, not a state dict")
    return state


def _parameter_order(path: Path, obj: dict, param_order: Sequence[str] | None) -> list[str] | None:
    if param_order is not None:
        return list(param_order)
    optimizer = obj.get("optimizer")
    if assemble.is_optimizer_state(optimizer) and not all(
        "param_names" in g for g in optimizer["param_groups"]
    ):
        order = _transformers_order(path)
        if order is not None:
            return order
    weights = obj["weights"]
    if all(not name.endswith(".safetensors") for name in weights):
        return [key for state in weights.values() for key in state]
    return None


def _transformers_order(path: Path) -> list[str] | None:
    """``named_parameters()`` order of the architecture in config.json, if transformers
    can build it; any failure just means this source is unavailable."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        if architecture is None:
            return None
        with torch.device("meta"):
            model = architecture(config)
        return [name for name, _ in model.named_parameters()]
    except Exception:
        return None
