"""The benchmark's outputs: a markdown table, a JSON file of every figure and PNG plots.

Everything is rendered from the results dict of :mod:`excp.bench.runner`, so the
table, the plots and the JSON cannot disagree. Plots use matplotlib's object API with
the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

TABLE = "bench.md"
FIGURES = "bench.json"
RATIO_PLOT = "ratio_vs_loss.png"
BYTES_PLOT = "bytes_per_checkpoint.png"
CURVES_PLOT = "loss_curves.png"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}%"


def _kind(entry: dict[str, Any]) -> str:
    if not entry["lossless"]:
        return "lossy"
    if not entry["available"]:
        return "lossless"
    return "lossless, bit-exact ✓" if entry["bit_exact"] else "lossless, **NOT bit-exact**"


def _fidelity(entry: dict[str, Any]) -> str:
    """Worst relative L2 error of weights / first / second moments."""
    errors = entry["worst_rel_l2"]
    if entry["bit_exact"]:
        return "0 (bit-exact)"
    return " / ".join(f"{errors[g]:.1e}" if g in errors else "—" for g in ("weight", "exp_avg", "exp_avg_sq"))


def table(results: dict[str, Any]) -> str:
    """The markdown table of every contender."""
    workload = results["mode"] == "workload"
    loss_columns = ["final loss Δ (closed loop)", "worst Δ (open loop)"] if workload else \
        ["worst rel. L2 error (w / m / v)"]
    head = ["contender", "kind", "ratio", "bits/param", *loss_columns,
            "encode M params/s", "decode M params/s", "peak memory enc / dec"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in results["contenders"]:
        if not e["available"]:
            cells = [e["name"], _kind(e), e["status"]] + ["—"] * (len(head) - 3)
        else:
            if workload:
                closed = e.get("closed_loop", {})
                fidelity = [_pct(closed.get("delta")), _pct(e["open_loop"]["worst_delta"])]
            else:
                fidelity = [_fidelity(e)]
            bold = "**" if e["key"] == "default" else ""
            cells = [f"{bold}{e['name']}{bold}", _kind(e), f"{bold}{e['ratio']:.2f}×{bold}",
                     f"{e['bits_per_param']:.2f}", *fidelity,
                     f"{e['encode_mparams_per_s']:.1f}", f"{e['decode_mparams_per_s']:.1f}",
                     f"{e['encode_peak_mb']:.0f} / {e['decode_peak_mb']:.0f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(results: dict[str, Any]) -> list[str]:
    """One line per benchmark target: met, or missed and by how much."""
    return [f"- {'met' if t['met'] else '**missed**'}: {t['target']}: {t['detail']}"
            for t in results["targets"]]


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    """The report: what ran, the table, the targets, definitions and the plots."""
    s, m = results["settings"], results["machine"]
    checkpoints = results["checkpoints"]
    params = checkpoints[0]["num_parameters"] if checkpoints else 0
    lines = [f"# excp bench ({results['mode']})", "", "```", results["command"], "```", "",
             f"Took {results['seconds'] / 60:.1f} min on {m['cpus']} CPUs "
             f"({m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}), "
             f"torch {m['torch']}, excp {m['excp']}.", ""]
    if results["mode"] == "workload":
        ref = results["reference"]
        lines += [f"Workload: the `{s['config']}` GPT ({params / 1e6:.2f}M parameters, AdamW) trained "
                  f"{s['steps']} steps, a checkpoint every {s['every']} ({len(checkpoints)} checkpoints), "
                  f"seed {s['seed']}. Uncompressed final eval loss {ref['final_loss']:.4f} "
                  f"({ref['seconds']:.0f} s). Ratio, bits/param, speed, memory and the open-loop Δ are "
                  "measured on the reference run's checkpoints (the same for every contender); the "
                  "closed-loop Δ comes from a run that resumes training from every reconstruction.", ""]
    else:
        lines += [f"{len(checkpoints)} checkpoints ({params / 1e6:.2f}M parameters each), coded as one "
                  "chain in the order given; open loop only.", ""]
    lines += [table(results), ""]
    if results["targets"]:
        lines += ["Targets:", "", *target_lines(results), ""]
    lines += [
        "Ratio: every weight and moment as float32 over the stored bytes, summed over the chain "
        "(a contender stores the whole checkpoint). Bits/param: 8 · stored bytes / weights. "
        "M params/s: weights (each with its moments) per second. Peak memory: the largest growth "
        "of the process's RSS during one checkpoint's encode or decode. Lossless contenders are "
        "checked bit for bit on decode; their Δ is 0 only when that check passed.", ""]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _colors(results: dict[str, Any]) -> dict[str, str]:
    """One colour per contender, the same in every plot."""
    return {e["key"]: f"C{i % 10}" for i, e in enumerate(results["contenders"])}


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_ratio(results: dict[str, Any], path: Path) -> None:
    """Ratio against loss Δ (workload, closed loop) or weight error (user checkpoints)."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    workload = results["mode"] == "workload"
    if workload:
        ax.set_ylabel("final eval loss Δ vs uncompressed, closed loop (%)")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="Δ = +0.5%")
    else:
        ax.set_ylabel("worst relative L2 error of the weights")
    colors = _colors(results)
    for e in results["contenders"]:
        if not e["available"]:
            continue
        if workload:
            y = 100 * e["closed_loop"]["delta"]
        else:
            y = 0.0 if e["bit_exact"] else e["worst_rel_l2"].get("weight", 0.0)
        ax.scatter([e["ratio"]], [y], marker="o" if e["lossless"] else "s", s=45, label=e["name"],
                   color=colors[e["key"]])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio (fp32 weights + moments / stored), log scale")
    ax.set_title("Ratio against quality (circles: lossless, squares: lossy)")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_bytes(results: dict[str, Any], path: Path) -> None:
    """Stored bytes of each checkpoint along the chain, per contender."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    checkpoints = results["checkpoints"]
    workload = results["mode"] == "workload"
    xs = [c["step"] for c in checkpoints] if workload else list(range(1, len(checkpoints) + 1))
    ax.plot(xs, [c["raw_bytes"] / 1e6 for c in checkpoints], "k--", label="raw fp32 w + m + v")
    colors = _colors(results)
    for e in results["contenders"]:
        if e["available"]:
            ax.plot(xs, [b / 1e6 for b in e["stored_bytes_per_checkpoint"]], marker=".", label=e["name"],
                    color=colors[e["key"]])
    ax.set_yscale("log")
    ax.set_xlabel("training step" if workload else "checkpoint (in the order given)")
    ax.set_ylabel("stored MB, log scale")
    ax.set_title("Stored bytes per checkpoint along the chain")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Eval-loss curves of the closed loops, and their difference from the reference."""
    fig = Figure(figsize=(10, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    reference = results["reference"]["curve"]
    steps = [s for s, _ in reference]
    top.plot(steps, [loss for _, loss in reference], "k-", linewidth=2, label="uncompressed")
    bottom.axhline(0.0, color="black", linewidth=1)
    colors = _colors(results)
    for e in results["contenders"]:
        curve = e.get("closed_loop", {}).get("curve") if e["available"] else None
        if not curve:
            continue
        color = colors[e["key"]]
        top.plot([s for s, _ in curve], [loss for _, loss in curve], label=e["name"], color=color)
        bottom.plot([s for s, _ in curve],
                    [100 * (loss / ref - 1) for (_, loss), (_, ref) in zip(curve, reference, strict=True)],
                    marker=".", label=e["name"], color=color)
    top.set_ylabel("eval loss")
    top.set_title("Closed loop: training resumed from every reconstruction")
    _legend_outside(top)
    bottom.set_ylabel("Δ vs uncompressed (%)")
    bottom.set_xlabel("training step")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots, the JSON and the markdown table into ``out``; returns their paths."""
    plots = [(RATIO_PLOT, plot_ratio), (BYTES_PLOT, plot_bytes)]
    if results["mode"] == "workload":
        plots.append((CURVES_PLOT, plot_curves))
    written = []
    for name, draw in plots:
        draw(results, out / name)
        written.append(out / name)
    results = {**results, "outputs": [p.name for p in written] + [TABLE, FIGURES]}
    (out / FIGURES).write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    (out / TABLE).write_text(markdown(results, [p.name for p in written]))
    return [*written, out / FIGURES, out / TABLE]
