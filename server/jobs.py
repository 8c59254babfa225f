"""The CPU-heavy work of the service, as plain functions a worker process can run.

They take the store as a URL (reopened once per worker process) or, for a store only
this process can see (``memory://``), as the object itself on a worker thread. They
return plain data, and the errors meant for the client are
:class:`~excp.errors.ExcpError`; both pickle, so a process pool carries them back
unchanged.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import threading
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from excp import api
from excp.adapters import hf_trainer, save_checkpoint, state_dict
from excp.bundle import Bundle
from excp.chain import Base, Chain, recon_digest
from excp.codec.params import CodecParams
from excp.errors import ExcpError, InvalidInput
from excp.store import Store, open_store

FORMATS = ("torch", "safetensors", "tar")


def init_worker(push_cache: str, server_pid: int, threads: int) -> None:
    """Per worker process: keep api.push's head reconstructions in the server's cache,
    share the cores with the other workers (torch would give each all of them: four
    concurrent raw uploads on two cores were 3x slower than one after the other), and
    exit when the server does. A pool's workers outlive a server that is killed
    (SIGKILL, OOM killer), and a supervisor restarting it would pile them up."""
    os.environ["EXCP_CACHE"] = push_cache
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with, args=(server_pid,), daemon=True, name="excp-orphan-watch").start()


def _exit_with(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(1.0)
    os._exit(0)


@lru_cache(maxsize=4)
def _open(url: str) -> Store:
    return open_store(url)


def _store(store: str | Store) -> Store:
    return _open(store) if isinstance(store, str) else store


def allowed_base(chain: Chain, allowed: tuple[str, ...]) -> api.BaseSpec | None:
    """The run's seed base, if it has one and its factory is one the server trusts."""
    base = chain.base()
    if base is None:
        return None
    if base.factory not in allowed:
        raise InvalidInput(f"run {chain.run!r} starts from model factory {base.factory!r}, which this "
                           f"server does not run: start it with --allow-factory {base.factory}")
    return api.BaseSpec(base.seed, base.factory)


def create_run(store: str | Store, run: str, params: dict[str, Any], seed: int | None,
               factory: str | None, keep_exact: int = 0) -> None:
    """Create a run; with a seed base, build the factory's weights to record their hash."""
    chain = Chain(_store(store), run)
    base = None
    if factory is not None and seed is not None:
        spec = api.BaseSpec(seed, factory)
        base = Base(seed, factory, recon_digest(api.build_base(spec)))
    chain.create(CodecParams.from_dict(params), base, keep_exact=keep_exact)


def compress(store: str | Store, run: str, step: int, path: str, allowed: tuple[str, ...]
             ) -> tuple[dict[str, Any], bool]:
    """Push the uploaded checkpoint at ``path`` as ``step`` of ``run`` (which must exist),
    with its exact copy if the run keeps them; returns the commit record and whether it
    was created (False: the same checkpoint was already there)."""
    try:
        st = _store(store)
        chain = Chain(st, run)
        chain.config()
        bundle = api.to_bundle(path)
        if bundle.step is not None and bundle.step != step:
            raise InvalidInput(f"the uploaded checkpoint says it is step {bundle.step}, not {step}: "
                               f"upload it as step {bundle.step}")
        result, _ = api.push(bundle, run, step=step, store=st, base=allowed_base(chain, allowed))
        return asdict(result.commit), result.created
    except ExcpError as err:  # never show the server's spool path to the client
        raise type(err)(err.message.replace(path, "the uploaded file")) from None


def restore_to(store: str | Store, run: str, step: int, fmt: str, out: str,
               allowed: tuple[str, ...], lossy: bool = False) -> None:
    """Reconstruct ``step`` (bit for bit where it has an exact copy, unless ``lossy``)
    and write it to ``out`` as ``fmt`` (see :func:`write`)."""
    st = _store(store)
    chain = Chain(st, run)
    bundle = api.restore(run, step, store=st, base=allowed_base(chain, allowed), lossy=lossy)
    write(bundle, fmt, Path(out), run, step)


def check_format(layout: str, fmt: str) -> None:
    """Refuse a format that cannot hold this layout, before anything is decoded."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if layout == hf_trainer.LAYOUT and fmt == "torch":
        raise InvalidInput("this checkpoint is a Hugging Face Trainer directory: "
                           "use format=tar (the directory) or format=safetensors (its tensors)")
    if layout != hf_trainer.LAYOUT and fmt == "tar":
        raise InvalidInput("format=tar is for Hugging Face Trainer checkpoints: use format=torch "
                           "or format=safetensors")


def write(bundle: Bundle, fmt: str, out: Path, run: str, step: int) -> None:
    """Write a restored bundle as one file.

    * ``torch``: what ``torch.load(weights_only=True)`` reads back as the pushed object:
      the checkpoint dict (``torch_dict``) or the state dict (``state_dict``), the same
      bytes a local ``excp restore`` writes;
    * ``safetensors``: a bare state dict pushed from a safetensors file comes back as
      that file; anything else as every tensor of the bundle under its entry name
      (``0.weight``, ``0.weight@exp_avg``, ``optimizer/state/0/step``), with the run,
      step and layout in the metadata; non-tensor state is not in it;
    * ``tar``: a Trainer directory as an uncompressed tar of ``checkpoint-<step>/``.
    """
    check_format(bundle.layout, fmt)
    if fmt == "tar":
        directory = Path(f"{out}.d.part")
        try:
            save_checkpoint(bundle, directory)
            with tarfile.open(out, "w") as tar:
                tar.add(directory, arcname=f"checkpoint-{step}")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    from_safetensors = state_dict.SAFETENSORS_METADATA in bundle.extras
    if fmt == "torch" and bundle.layout == state_dict.LAYOUT and from_safetensors:
        torch.save(state_dict.from_bundle(bundle), out)
    elif fmt == "torch" or (bundle.layout == state_dict.LAYOUT and from_safetensors):
        save_checkpoint(bundle, out)
    else:
        tensors = {name: entry.tensor.contiguous() for name, entry in bundle.tensors.items()}
        save_file(tensors, str(out), metadata={"format": "pt", "excp.run": run, "excp.step": str(step),
                                               "excp.layout": bundle.layout})
