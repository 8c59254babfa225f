"""Reading user files safely and writing restored checkpoints without clobbering anything.

Checkpoints come from anywhere, so they are read with ``weights_only=True`` only: a
pickle that would construct arbitrary objects is refused, never executed. Restores go
to a temporary sibling first and are renamed into place, so a failed restore leaves no
half-written checkpoint behind, and they never overwrite what a user already has.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from excp.errors import InvalidInput

ACCEPTS = (
    "excp accepts a torch.save'd dict with 'model' and 'optimizer', a Hugging Face "
    "Trainer checkpoint directory, or a bare state_dict"
)
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def first_line(exc: BaseException) -> str:
    """A complete one-line reason from an exception whose message may span a page.

    torch's refusal to unpickle an object weights-only is a page of advice about
    trusting the file, with the one useful fact (the type it refused) in its middle:
    that type is the reason. Any other message gives its first sentence."""
    text = str(exc).strip()
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return f"a pickled {unsafe.group(1)}, which excp does not unpickle"
    sentence = text.splitlines()[0].split(". ")[0].strip().rstrip(".") if text else ""
    return sentence or type(exc).__name__


def not_a_checkpoint(path: Path, reason: str) -> InvalidInput:
    return InvalidInput(f"{path} is not a checkpoint: {reason}; {ACCEPTS}")


def load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # A plain pickle makes torch warn about its protocol before failing: the error says it.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise not_a_checkpoint(path, _unloadable(path, exc)) from exc


def _unloadable(path: Path, exc: BaseException) -> str:
    """What a file is, when torch cannot load it weights-only (torch's own message says
    how torch's unpickler failed, which tells a user nothing about their file)."""
    if _UNSAFE_GLOBAL.search(str(exc)):
        return f"it holds {first_line(exc)} (only tensors and plain Python values load safely)"
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, EOFError):
        return "the file ends early, as if cut off"
    if zipfile.is_zipfile(path):
        return "it is a zip file, but not one torch.save wrote"
    return "it is not a file torch.save wrote"


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through an open file: given a path, torch names the zip's inner
    folder after the file, and excp writes to a randomly named staging file, so two
    restores of one checkpoint would differ in bytes (not in tensors)."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors of a safetensors file and its header metadata (kept for writing back)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        return load_file(str(path)), metadata
    except Exception as exc:
        reason = f"not a readable safetensors file ({first_line(exc)})"
        raise not_a_checkpoint(path, reason) from exc


def check_output(out: Path, *, directory: bool) -> None:
    """Refuse an ``out`` that exists, except an empty directory for directory layouts."""
    if directory and out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() or out.is_symlink():
        hint = "a new path or an empty directory" if directory else "a new path"
        raise InvalidInput(f"{out} already exists and excp never overwrites; pick {hint}")


@contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """A temporary path next to ``out`` that becomes ``out`` when the block succeeds."""
    check_output(out, directory=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory next to ``out`` that becomes ``out`` when the block succeeds."""
    check_output(out, directory=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(out: Path) -> Path:
    """A fresh hidden name beside ``out``; unlike tempfile's, what is created there gets the
    user's usual permissions (mkstemp would make the restored checkpoint private)."""
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.part")
