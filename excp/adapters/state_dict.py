"""A bare state dict (weights only), from a ``torch.save`` file or a ``.safetensors`` file.

With no optimizer there are no moments: every floating tensor is a weight. A state
dict read from safetensors is written back as safetensors with the same header
metadata, recorded in the ``state_dict/safetensors_metadata`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from excp.adapters import assemble
from excp.adapters.files import load_safetensors, not_a_checkpoint, save_torch, staged_file
from excp.bundle import Bundle

LAYOUT = "state_dict"
SAFETENSORS_METADATA = f"{LAYOUT}/safetensors_metadata"


def is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def to_bundle(state: dict[str, torch.Tensor]) -> Bundle:
    return assemble.to_bundle(LAYOUT, state, [()], [], order=None)


def from_bundle(bundle: Bundle) -> dict[str, torch.Tensor]:
    return assemble.from_bundle(bundle, LAYOUT)


def load_safetensors_file(path: Path) -> Bundle:
    tensors, metadata = load_safetensors(path)
    if not tensors:
        raise not_a_checkpoint(path, "the safetensors file holds no tensors")
    bundle = to_bundle(tensors)
    bundle.extras[SAFETENSORS_METADATA] = json.dumps(metadata or {}).encode()
    return bundle


def save(bundle: Bundle, out: Path) -> Path:
    """Write the state dict in the format it was read from; tensors on the CPU."""
    state = assemble.from_bundle(bundle, LAYOUT, convert=lambda t: t.cpu())
    metadata = bundle.extras.get(SAFETENSORS_METADATA)
    with staged_file(out) as tmp:
        if metadata is None:
            save_torch(state, tmp)
        else:
            save_safetensors(state, tmp, json.loads(metadata))
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` needs contiguous tensors; "format": "pt" is what transformers expects."""
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
