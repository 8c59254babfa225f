"""User checkpoints to and from :class:`~excp.bundle.Bundle`; the only code that knows layouts.

Layouts (``Bundle.layout``):

* ``torch_dict``: a ``torch.save``d dict with a model state dict and optionally an
  optimizer state dict and anything else (scheduler, RNG states, metadata);
* ``state_dict``: a bare state dict, from a ``torch.save`` file or a ``.safetensors`` file;
* ``hf_trainer``: a Hugging Face Trainer checkpoint directory.

Entries: weights and non-float model tensors are named by their state-dict key,
moments ``<weight>@exp_avg`` (``bundle.moment_name``), and every other tensor by its
path in the checkpoint object, e.g. ``optimizer/state/3/step`` or ``rng/cpu``.
Extras: ``<layout>/skeleton`` (everything that is not a tensor, see ``skeleton``),
``state_dict/safetensors_metadata``, ``hf_trainer/safetensors_metadata`` and
``hf/<relative path>`` (the other files of a Trainer directory, byte for byte).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from excp.adapters import hf_trainer, state_dict, torch_dict
from excp.adapters.files import load_torch, not_a_checkpoint
from excp.bundle import Bundle
from excp.errors import InvalidInput, NotFound

__all__ = ["load_checkpoint", "save_checkpoint"]

_WRITERS = {
    torch_dict.LAYOUT: torch_dict.save,
    state_dict.LAYOUT: state_dict.save,
    hf_trainer.LAYOUT: hf_trainer.save,
}


def load_checkpoint(path: str | Path, *, param_order: Sequence[str] | None = None) -> Bundle:
    """Read a checkpoint of any supported layout; files are only ever loaded weights-only.

    ``param_order`` (``[n for n, _ in model.named_parameters()]``) lets excp pair an
    optimizer that does not record ``param_names`` when the file does not keep the
    model's parameter order (safetensors) or keeps it ambiguously (buffers among params).
    """
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path} does not exist")
    if path.is_dir():
        if hf_trainer.is_trainer_dir(path):
            return hf_trainer.load(path, param_order=param_order)
        raise not_a_checkpoint(path, "a directory without model.safetensors or pytorch_model.bin")
    if path.suffix == ".safetensors":
        return state_dict.load_safetensors_file(path)
    obj = load_torch(path)
    if torch_dict.model_key(obj) is not None:
        return torch_dict.to_bundle(obj, param_order=param_order)
    if state_dict.is_state_dict(obj):
        return state_dict.to_bundle(obj)
    raise not_a_checkpoint(path, _describe(obj))


def save_checkpoint(bundle: Bundle, out: str | Path) -> Path:
    """Write ``bundle`` in the layout it was read from, refusing to overwrite anything
    (an ``hf_trainer`` directory may go into an existing empty directory)."""
    writer = _WRITERS.get(bundle.layout)
    if writer is None:
        raise InvalidInput(f"unknown checkpoint layout {bundle.layout!r}; cannot write it")
    return writer(bundle, Path(out))


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"it holds a dict with keys {keys or 'none'} and no model state dict"
    return f"it holds a {type(obj).__name__}"
