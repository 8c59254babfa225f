"""``excp bench`` from settings to figures: which protocol runs on what, and the summary
figures of each contender, as one JSON-ready dict that :mod:`excp.bench.report` renders.

Definitions, the same for every contender:

* ratio: raw bytes (every weight and moment as float32, :func:`excp.chain.raw_size`)
  over stored bytes, both summed over the whole chain;
* bits/param: 8 · stored bytes / weights, summed over the chain (a weight's moments
  are in its bits);
* encode / decode M params/s: weights (each with its moments) over the summed time;
* peak memory: the largest RSS growth during one checkpoint's encode or decode.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from excp.bench import protocol
from excp.bench.contenders import Contender, select
from excp.bench.inputs import FileSource, MemorySource, resolve, survey
from excp.bench.protocol import Bar, ClosedLoop, OpenLoop, Reference, no_bar
from excp.errors import InvalidInput

DEFAULT = {"config": "small", "steps": 700, "every": 100}
QUICK = {"config": "tiny", "steps": 200, "every": 40}
THREADS = {"tiny": 1, "small": 2}
"""Threads torch trains and codes the workload with, per model: a fixed count keeps
float reductions, hence losses, the same on any machine. The reference machine has two
cores; the tiny model trains faster on one, and two OpenMP threads that have to share
a busy machine's cores with other processes slow training down tenfold or more. User
checkpoints are coded with the process's own setting (torch's default: every core)."""


@dataclass
class Settings:
    """What to benchmark. ``checkpoints`` set means the user's files (open loop only);
    otherwise the workload with ``config``, ``steps``, ``every`` and ``seed``."""

    out: str
    quick: bool = False
    config: str | None = None
    steps: int | None = None
    every: int | None = None
    seed: int = 0
    contenders: Sequence[str] | None = None
    checkpoints: Sequence[str] = field(default_factory=tuple)

    def resolved(self) -> Settings:
        """The settings with the mode's defaults filled in, checked."""
        base = QUICK if self.quick else DEFAULT
        done = Settings(self.out, self.quick, self.config or base["config"],
                        base["steps"] if self.steps is None else self.steps,
                        base["every"] if self.every is None else self.every,
                        self.seed, self.contenders, tuple(self.checkpoints))
        if not self.checkpoints and (done.every < 1 or done.steps < done.every):
            raise InvalidInput(f"--steps {done.steps} --every {done.every}: need steps >= every >= 1 "
                               "so that at least one checkpoint is taken")
        return done

    def command(self) -> str:
        """The command line that reproduces these (resolved) settings."""
        parts = ["excp bench", "--out", self.out]
        if self.checkpoints:
            parts += ["--checkpoints", *self.checkpoints]
        else:
            parts += (["--quick"] if self.quick else []) + [
                "--config", str(self.config), "--steps", str(self.steps), "--every", str(self.every),
                "--seed", str(self.seed)]
        if self.contenders is not None:
            parts += ["--contenders", ",".join(self.contenders)]
        return " ".join(parts)


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _open_figures(run: OpenLoop) -> dict[str, Any]:
    raw, stored, params = sum(run.raw_bytes), sum(run.stored_bytes), sum(run.num_parameters)
    encode_s = sum(m.seconds for m in run.encode)
    decode_s = sum(m.seconds for m in run.decode)
    groups = sorted({g for errors in run.rel_l2 for g in errors})
    return {
        "ratio": _safe_div(raw, stored),
        "bits_per_param": _safe_div(8 * stored, params),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "stored_bytes_per_checkpoint": run.stored_bytes,
        "encode_seconds": encode_s,
        "decode_seconds": decode_s,
        "encode_mparams_per_s": _safe_div(params, encode_s) / 1e6,
        "decode_mparams_per_s": _safe_div(params, decode_s) / 1e6,
        "encode_peak_mb": max(m.peak_bytes for m in run.encode) / 1e6,
        "decode_peak_mb": max(m.peak_bytes for m in run.decode) / 1e6,
        "bit_exact": all(run.bit_exact),
        "bit_exact_per_checkpoint": run.bit_exact,
        "worst_rel_l2": {g: max(e.get(g, 0.0) for e in run.rel_l2) for g in groups},
    }


def _unavailable(contender: Contender, reason: str) -> dict[str, Any]:
    return {"key": contender.key, "name": contender.name, "lossless": contender.lossless,
            "available": False, "status": reason}


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "excp": metadata.version("excp")}


def run_workload(settings: Settings, bar: Bar = no_bar) -> dict[str, Any]:
    """The reference run, every contender open loop on its checkpoints, and a closed loop
    for every contender not verified bit-exact."""
    s = settings.resolved()
    contenders = select(s.contenders)
    assert s.config is not None and s.steps is not None and s.every is not None
    start = time.perf_counter()
    reference = protocol.reference_run(s.config, s.steps, s.every, s.seed, bar)
    source = MemorySource(reference.checkpoints, [f"step {step}" for step in reference.steps])
    checkpoints = survey(source)
    evaluate = protocol.Evaluator(s.config, s.seed, s.steps)
    ref_losses = reference.checkpoint_losses
    entries: list[dict[str, Any]] = []
    needs_closed_loop: list[tuple[Contender, dict[str, Any]]] = []
    for contender in contenders:
        reason = contender.unavailable()
        if reason is not None:
            entries.append(_unavailable(contender, reason))
            continue
        coded = protocol.open_loop(contender, source, bar, evaluate, ref_losses)
        entry = {"key": contender.key, "name": contender.name, "lossless": contender.lossless,
                 "available": True, "status": "ok", **_open_figures(coded)}
        assert coded.losses is not None
        deltas = [loss / ref - 1 for loss, ref in zip(coded.losses, ref_losses, strict=True)]
        entry["open_loop"] = {"losses": coded.losses, "deltas": deltas, "worst_delta": max(deltas)}
        if contender.lossless and entry["bit_exact"]:
            entry["closed_loop"] = {"final_loss": reference.curve[-1][1], "delta": 0.0,
                                    "ratio": entry["ratio"], "verified_bit_exact": True}
        else:
            needs_closed_loop.append((contender, entry))
        entries.append(entry)
    del source
    reference.checkpoints.clear()
    for contender, entry in needs_closed_loop:
        closed = protocol.closed_loop(contender, s.config, s.steps, s.every, s.seed, bar)
        entry["closed_loop"] = _closed_figures(closed, reference)
    return {
        "mode": "workload", "command": s.command(), "settings": _settings_dict(s), "machine": _machine(),
        "reference": {"final_loss": reference.curve[-1][1], "curve": [list(p) for p in reference.curve],
                      "checkpoint_losses": ref_losses, "seconds": reference.seconds},
        "checkpoints": checkpoints,
        "contenders": entries,
        "targets": targets(entries),
        "seconds": time.perf_counter() - start,
    }


def _closed_figures(closed: ClosedLoop, reference: Reference) -> dict[str, Any]:
    base = reference.curve[-1][1]
    return {"final_loss": closed.final_loss, "delta": closed.final_loss / base - 1,
            "ratio": _safe_div(closed.raw_bytes, closed.stored_bytes),
            "curve": [list(p) for p in closed.curve], "seconds": closed.seconds,
            "verified_bit_exact": False}


def run_checkpoints(settings: Settings, bar: Bar = no_bar) -> dict[str, Any]:
    """Every contender open loop on the user's checkpoints; fidelity as relative L2
    error, since there is no eval function for a user's model."""
    s = settings.resolved()
    contenders = select(s.contenders)
    start = time.perf_counter()
    source = FileSource(resolve(s.checkpoints))
    checkpoints = survey(source)
    entries: list[dict[str, Any]] = []
    for contender in contenders:
        reason = contender.unavailable()
        if reason is not None:
            entries.append(_unavailable(contender, reason))
            continue
        coded = protocol.open_loop(contender, source, bar)
        entries.append({"key": contender.key, "name": contender.name, "lossless": contender.lossless,
                        "available": True, "status": "ok", **_open_figures(coded)})
    return {
        "mode": "checkpoints", "command": s.command(), "settings": _settings_dict(s), "machine": _machine(),
        "checkpoints": checkpoints,
        "contenders": entries,
        "targets": targets(entries),
        "seconds": time.perf_counter() - start,
    }


def _settings_dict(s: Settings) -> dict[str, Any]:
    return {"out": s.out, "quick": s.quick, "config": s.config, "steps": s.steps, "every": s.every,
            "seed": s.seed, "contenders": list(s.contenders) if s.contenders is not None else None,
            "checkpoints": [str(p) for p in s.checkpoints], "threads": torch.get_num_threads()}


def targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's targets (ratio, quality, speed), each met or missed by how much
    (only those whose contenders ran)."""
    by_key = {e["key"]: e for e in entries if e.get("available")}
    found: list[dict[str, Any]] = []
    default, paper = by_key.get("default"), by_key.get("paper")
    if default and paper:
        factor = _safe_div(default["ratio"], paper["ratio"])
        found.append({"target": "excp default ratio >= 2x the paper configuration's",
                      "met": factor >= 2, "value": factor,
                      "detail": f"{factor:.2f}x ({default['ratio']:.1f}x vs {paper['ratio']:.1f}x)"})
        if "closed_loop" in default and "closed_loop" in paper:
            d, p = default["closed_loop"]["delta"], paper["closed_loop"]["delta"]
            found.append({"target": "excp default closed-loop loss delta <= the paper configuration's",
                          "met": d <= p, "value": d - p,
                          "detail": f"{100 * d:+.2f}% vs {100 * p:+.2f}%"})
    if default and "closed_loop" in default:
        d = default["closed_loop"]["delta"]
        found.append({"target": "excp default final loss within 0.5% of the uncompressed run",
                      "met": abs(d) <= 0.005, "value": d, "detail": f"{100 * d:+.2f}%"})
    lossless, planes = by_key.get("lossless"), by_key.get("byteplane")
    if lossless and planes:
        gain = _safe_div(lossless["ratio"], planes["ratio"]) - 1
        found.append({"target": "excp lossless ratio > byte-plane zstd's on the same checkpoints",
                      "met": gain > 0, "value": gain,
                      "detail": f"{lossless['ratio']:.4f}x vs {planes['ratio']:.4f}x ({100 * gain:+.2f}%)"})
    return found


def check(settings: Settings) -> None:
    """Refuse bad settings before anything is trained or written."""
    select(settings.resolved().contenders)


def run(settings: Settings, bar: Bar = no_bar) -> dict[str, Any]:
    """Benchmark per ``settings``: the user's checkpoints if given, else the workload."""
    if settings.checkpoints:
        return run_checkpoints(settings, bar)
    torch.set_num_threads(THREADS[settings.resolved().config])
    return run_workload(settings, bar)


def out_dir(path: str) -> Path:
    """The output directory, made if needed; an existing file there is an error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {path} is a file: pass a directory for the benchmark's outputs")
    out.mkdir(parents=True, exist_ok=True)
    return out
