"""The ``excp`` command: parse, call :mod:`excp.api`, print, map errors to exit codes.

Exit codes: 0 ok; 1 unexpected error; 2 invalid input (usage errors too: a missing
argument, a bad option value, an unknown option); 3 not found; 4 conflict; 5 corrupt
data; 6 unsupported format version; 7 store or service unavailable; 8 the service
refused the token. Every error is one ``excp: error [<code>]: ...`` line on stderr.
"""

from __future__ import annotations

import os
import time

# Large tensors on transparent huge pages: fewer page faults when restored tensors are
# allocated (a documented PyTorch allocator switch, read when torch loads).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from excp import api, memory
from excp.cli_usage import OneLineUsage
from excp.client.target import open_target
from excp.codec.params import PRESETS, WEIGHT_RULES, preset
from excp.errors import ExcpError, InvalidInput
from excp.target import Target, is_service_url
from excp.units import human_bytes

STORE_HELP = ("Store URL: a directory, file://DIR, s3://BUCKET/PREFIX, memory://, or a service as "
              "excp://HOST:PORT (default: $EXCP_STORE or ./excp-store).")
SERVER_HELP = ("An excp service, excp://HOST:PORT or http(s)://HOST[:PORT] (default: $EXCP_SERVER); "
               "its token comes from $EXCP_TOKEN. Archives are coded and decoded here.")


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and the error's exit code, never a traceback."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ExcpError as err:
            click.echo(f"excp: error [{err.code}]: {err.message}", err=True)
            sys.exit(err.exit_code)
    return wrapper


@contextmanager
def _bar(total: int, unit: str, desc: str) -> Iterator[Callable[[int], None]]:
    with tqdm(total=total, unit=unit, unit_scale=True, desc=desc, leave=False,
              disable=None, file=sys.stderr) as bar:
        yield bar.update


def _base(seed: int | None, factory: str | None) -> api.BaseSpec | None:
    if (seed is None) != (factory is None):
        raise click.UsageError("--init-seed and --model-factory go together: give both, or neither")
    return None if seed is None else api.BaseSpec(seed, factory)


def _columns(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Rows as aligned text, each column as wide as its widest cell: nothing is cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


store_option = click.option("--store", default=None, envvar="EXCP_STORE", help=STORE_HELP)
server_option = click.option("--server", default=None, envvar="EXCP_SERVER", help=SERVER_HELP)


def where(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--store`` and ``--server``, turned into one ``target`` argument."""
    @wraps(fn)
    def wrapper(*args: Any, store: str | None, server: str | None, **kwargs: Any) -> Any:
        with _target(store, server) as target:
            return fn(*args, target=target, **kwargs)
    return store_option(server_option(_fail_cleanly(wrapper)))


def _target(store: str | None, server: str | None) -> Target:
    if server is None:
        return open_target(store)
    source = click.get_current_context().get_parameter_source("store")
    if store is not None and source is click.core.ParameterSource.COMMANDLINE:
        raise InvalidInput("--store and --server name two different places: give one of them")
    if not is_service_url(server):
        raise InvalidInput(f"--server {server!r} is not a service URL: use excp://HOST:PORT or "
                           "http(s)://HOST:PORT (a store path goes to --store)")
    return open_target(server)
run_option = click.option("--run", "run", required=True, help="Run name.")
base_options = [
    click.option("--init-seed", type=int, default=None,
                 help="Seed that rebuilds the run's initial weights (with --model-factory)."),
    click.option("--model-factory", default=None,
                 help="pkg.module:fn; fn(seed) returns the initial model or state dict."),
]


def with_base(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(base_options):
        fn = option(fn)
    return fn


@click.group(cls=OneLineUsage, name="excp")
@click.version_option(package_name="excp")
def main() -> None:
    """excp: checkpoint compression for training runs."""
    memory.tune_allocator()


@main.command()
@click.argument("path", type=click.Path(exists=True))
@run_option
@click.option("--step", type=int, default=None, help="Step number (default: read from the checkpoint).")
@where
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default=None,
              help="Named codec configuration (default: default).")
@click.option("--mode", type=click.Choice(["excp", "lossless"]), default=None,
              help="Lossy ExCP or bit-exact.")
@click.option("--weight-rule", type=click.Choice(list(WEIGHT_RULES)), default=None,
              help="How a weight and its Adam state are coded: adam (default), uniform, paper or keep.")
@click.option("--lr-step", type=float, default=None,
              help="Adam rule: weight level spacing in units of the learning rate (quality knob).")
@click.option("--v-step", type=int, default=None,
              help="Adam rule: v is kept within a factor 2^(v_step/2).")
@click.option("--m-step", type=float, default=None,
              help="Adam rule: level spacing of m/sqrt(v).")
@click.option("--weight-step", type=float, default=None,
              help="Uniform rule (and adam without a learning rate): residual step as a fraction of its RMS.")
@click.option("--keyframe-step", type=float, default=None,
              help="The same for keyframes, as a fraction of the weights' RMS.")
@click.option("--alpha", type=float, default=None, help="Weight pruning strength (paper rule).")
@click.option("--beta", type=float, default=None, help="Moment pruning strength.")
@click.option("--weight-bits", type=int, default=None, help="Paper/keep rules: bits per residual code.")
@click.option("--moment-bits", type=int, default=None, help="Bits per moment code.")
@click.option("--keyframe-bits", type=int, default=None, help="Paper/keep rules: bits per keyframe code.")
@click.option("--keyframe-every", type=int, default=None, help="A standalone keyframe every K links.")
@click.option("--zstd-level", type=int, default=None, help="zstd level, 1-22.")
@click.option("--keep-exact", type=int, default=None, metavar="K",
              help="New run: also keep an exact copy of the newest K steps (default 0); "
                   "an existing run keeps its own.")
@with_base
@_fail_cleanly
def push(path: str, run: str, step: int | None, target: Target, preset_name: str | None,
         init_seed: int | None, model_factory: str | None, keep_exact: int | None, **options: Any) -> None:
    """Compress the checkpoint at PATH and commit it as a step of RUN."""
    params = None
    if preset_name or any(v is not None for v in options.values()):
        params = preset(preset_name or "default").replace(**options)
    bundle = api.to_bundle(path)
    with _bar(bundle.num_parameters(), "param", "compress") as progress:
        result, _ = target.push(bundle, run, step=step, params=params,
                                base=_base(init_seed, model_factory), progress=progress,
                                keep_exact=keep_exact)
    c = result.commit
    state = "committed" if result.created else "already stored (no-op)"
    kind = "keyframe" if c.keyframe else f"link {c.depth}"
    click.echo(f"step {c.step} {state}: {kind}, raw {human_bytes(c.raw_bytes)}, "
               f"stored {human_bytes(c.size)}, ratio {c.ratio:.1f}x")


@main.command()
@run_option
@click.option("--step", default="latest", show_default=True, help="Step number or 'latest'.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Where to write the checkpoint.")
@where
@click.option("--device", default="cpu", show_default=True, help="Device to decode on.")
@click.option("--lossy", is_flag=True,
              help="Give the lossy reconstruction even where the step has an exact copy.")
@with_base
@_fail_cleanly
def restore(run: str, step: str, out: str, target: Target, device: str, lossy: bool,
            init_seed: int | None, model_factory: str | None) -> None:
    """Reconstruct a step of RUN (bit for bit where it has an exact copy) and write it in
    the layout it was pushed in."""
    with _bar(0, "link", "restore") as progress:
        bundle = target.restore(run, step, out, device=device, base=_base(init_seed, model_factory),
                                progress=progress, lossy=lossy)
    click.echo(f"restored run {run} step {bundle.step} to {out}")


@main.command(name="ls")
@click.option("--run", default=None, help="List this run's checkpoints instead of the runs.")
@where
@_fail_cleanly
def ls(run: str | None, target: Target) -> None:
    """List runs, or a run's checkpoints with sizes, ratios, keyframes and which restore exactly."""
    place = target.place
    if run is None:
        names = target.runs()
        for name in names:
            click.echo(name)
        if not names:  # on stderr: stdout stays a list of run names, empty here
            click.echo(f"no runs {place.where} yet: push one with "
                       f"`excp push CHECKPOINT --run NAME {place.option}`", err=True)
        return
    commits = target.commits(run)
    if not commits:
        click.echo(f"run {run!r} has no checkpoints yet: push one with "
                   f"`excp push CHECKPOINT --run {run} {place.option}`", err=True)
        return
    exact = set(target.exact_steps(run))
    click.echo(f"{'step':>12}  {'kind':<9} {'parent':>8} {'raw':>10} {'stored':>10} {'ratio':>8}  exact")
    for c in commits:
        kind = "keyframe" if c.keyframe else "link"
        parent = "-" if c.parent is None else str(c.parent)
        click.echo(f"{c.step:>12}  {kind:<9} {parent:>8} {human_bytes(c.raw_bytes):>10} "
                   f"{human_bytes(c.size):>10} {c.ratio:>7.1f}x  {'yes' if c.step in exact else '-'}")


@main.command()
@click.argument("archive", required=False, type=click.Path())
@click.option("--run", default=None, help="Inspect a stored checkpoint of this run.")
@click.option("--step", default=None, help="Step number or 'latest' (with --run).")
@where
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@_fail_cleanly
def inspect(archive: str | None, run: str | None, step: str | None, target: Target, as_json: bool) -> None:
    """Show an archive's codec parameters and tensor table (--json: every chunk's xxh64 too)."""
    if archive is not None or run is None:
        info = api.inspect_archive(archive, run=run, step=step)
    else:
        info = target.inspect(run, step if step is not None else "latest")
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    header = info["header"]
    if header.get("kind") == "exact":
        what = f"exact copy of link {header.get('link')}"
    else:
        what = "keyframe" if header.get("keyframe") else f"link of {header.get('parent')}"
    click.echo(f"run {header.get('run')} step {header.get('step')} layout {header.get('layout')} {what}")
    if "params" in header:
        click.echo("params " + json.dumps(header.get("params")))
    rows = [("tensor", "codec", "dtype", "shape", "stored")]
    for unit in info["units"]:
        first = unit["tensors"][0]
        rows.append((unit["name"], unit["codec"], first["dtype"], str(tuple(first["shape"])),
                     human_bytes(sum(s["stored"] for s in unit["streams"].values()))))
    for row in _columns(rows, right={4}):
        click.echo(row)
    for name, size in info["extras"].items():
        click.echo(f"extra {name} ({human_bytes(size)})")


@main.command()
@run_option
@click.option("-o", "--out", required=True, type=click.Path(), help="Empty directory to write into.")
@where
@with_base
@_fail_cleanly
def rebuild(run: str, out: str, target: Target, init_seed: int | None, model_factory: str | None) -> None:
    """Write every checkpoint of RUN, in step order."""
    total = len(target.commits(run))
    with _bar(total, "ckpt", "rebuild") as progress:
        paths = target.rebuild(run, out, base=_base(init_seed, model_factory), progress=progress)
    click.echo(f"wrote {len(paths)} checkpoints to {out}")


@main.command()
@run_option
@where
@with_base
@_fail_cleanly
def verify(run: str, target: Target, init_seed: int | None, model_factory: str | None) -> None:
    """Check every checksum of RUN and that every link decodes."""
    total = len(target.commits(run))
    with _bar(total, "ckpt", "verify") as progress:
        report = target.verify(run, base=_base(init_seed, model_factory), progress=progress)
    click.echo(f"ok: {report.checkpoints} checkpoints, {human_bytes(report.bytes_checked)} verified")


@main.command()
@click.option("--run", default=None, help="Only this run (default: every run).")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@store_option
@_fail_cleanly
def gc(run: str | None, dry_run: bool, store: str | None) -> None:
    """Delete archives that no commit record names (pushes that died before committing)."""
    report = api.gc(run, store=store, dry_run=dry_run)
    for key in report.keys:
        click.echo(key)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(report.keys)} unreferenced objects, {human_bytes(report.bytes)}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for bench.md, bench.json and the plots (made if needed).")
@click.option("--quick", is_flag=True, help="Tiny model, 200 steps, a checkpoint every 40: about a minute.")
@click.option("--config", type=click.Choice(["tiny", "small"]), default=None,
              help="Workload model [default: small; tiny with --quick].")
@click.option("--steps", type=int, default=None, help="Training steps [default: 700; 200 with --quick].")
@click.option("--every", type=int, default=None,
              help="A checkpoint every N steps [default: 100; 40 with --quick].")
@click.option("--seed", type=int, default=None, help="Training seed [default: 0].")
@click.option("--contenders", default=None,
              help="Comma-separated subset of torch-save, zstd, byteplane, zipnn, lossless, paper, safe, "
                   "default, max [default: all].")
@click.option("--checkpoints", "use_checkpoints", is_flag=True,
              help="Benchmark the checkpoint files or Hugging Face checkpoint directories given as "
                   "arguments (or directories holding them), in the order given, instead of training "
                   "the workload; open loop only.")
@click.argument("paths", nargs=-1, type=click.Path())
@_fail_cleanly
def bench(out: str, quick: bool, config: str | None, steps: int | None, every: int | None,
          seed: int | None, contenders: str | None, use_checkpoints: bool, paths: tuple[str, ...]) -> None:
    """Compare checkpoint compressors: ratio, training quality, speed and memory."""
    import time

    from excp.bench import report, runner
    from excp.errors import InvalidInput

    if paths and not use_checkpoints:
        raise InvalidInput(f"unexpected argument {paths[0]!r}: to benchmark checkpoint files, "
                           "put --checkpoints before them")
    if use_checkpoints:
        if not paths:
            raise InvalidInput("--checkpoints needs checkpoint files or directories after it")
        given = [name for name, value in (("--quick", quick or None), ("--config", config),
                                          ("--steps", steps), ("--every", every), ("--seed", seed))
                 if value is not None]
        if given:
            raise InvalidInput(f"{given[0]} sets up the training workload, which --checkpoints skips: "
                               "drop it")
    keys = None if contenders is None else [k.strip() for k in contenders.split(",") if k.strip()]
    settings = runner.Settings(out=out, quick=quick, config=config, steps=steps, every=every,
                               seed=0 if seed is None else seed, contenders=keys, checkpoints=paths)
    runner.check(settings)
    target = runner.out_dir(out)
    start = time.perf_counter()
    results = runner.run(settings, lambda desc, total, unit: _bar(total, unit, desc))
    written = report.write(results, target)
    click.echo(report.table(results))
    for line in report.target_lines(results):
        click.echo(line)
    click.echo(f"wrote {', '.join(p.name for p in written)} to {target}")
    click.echo(f"total time {time.perf_counter() - start:.0f} s ({results['command']})")


@main.command()
@store_option
@click.option("--config", type=click.Choice(["tiny", "small"]), default="small", show_default=True,
              help="Model size (small: ~3M parameters).")
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps.")
@click.option("--every", type=int, default=100, show_default=True, help="Push a checkpoint every N steps.")
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default="default",
              show_default=True, help="Codec configuration.")
@_fail_cleanly
def demo(store: str | None, config: str, steps: int, every: int, preset_name: str) -> None:
    """Train a small GPT, push compressed checkpoints, resume from them, compare losses."""
    from excp.demo import run_demo
    from excp.store import open_store

    if steps < every or every < 1:
        raise click.UsageError("--steps must be at least --every, and --every at least 1")
    start = time.perf_counter()
    result = run_demo(open_store(store), config=config, steps=steps, every=every,
                      params=preset(preset_name), report=click.echo)
    click.echo(f"stored {len(result.commits)} checkpoints of run {result.run!r}: "
               f"{result.ratio:.1f}x smaller than fp32 weights + Adam moments")
    click.echo(f"final eval loss: {result.loss_excp:.4f} resumed from excp vs "
               f"{result.loss_uncompressed:.4f} uncompressed ({100 * result.loss_delta:+.2f}%)")
    click.echo("(the run that resumed from every compressed checkpoint ends within that much of the "
               "run that never stopped; docs/fidelity.md measures it across training regimes)")
    click.echo(f"restored step {result.commits[-1].step} to {result.restored_path} "
               f"({time.perf_counter() - start:.0f} s in all)")


@main.command()
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("--tokens", "tokens_file", type=click.Path(dir_okay=False), default=None,
              help="JSON tokens file (default: $EXCP_TOKENS; with neither, anonymous read/write, "
                   "loopback hosts only).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Worker processes that compress raw uploads and reconstruct checkpoints.")
@click.option("--max-body", default="8GiB", show_default=True, help="Largest upload accepted.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Restore cache and upload spool (default: $EXCP_CACHE/serve or ~/.cache/excp/serve).")
@click.option("--cache-size", default="2GiB", show_default=True,
              help="Bound of the on-disk cache of reconstructed checkpoints (0 disables it).")
@click.option("--allow-factory", multiple=True,
              help="A model factory (pkg.module:fn) runs may be created from with a seed; repeatable.")
@click.option("--client-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a client may take to send a request's headers, and to send each 16 KiB of "
                   "its body; slower clients are cut off.")
@_fail_cleanly
def serve(store: str | None, host: str, port: int, tokens_file: str | None, workers: int, max_body: str,
          cache_dir: str | None, cache_size: str, allow_factory: tuple[str, ...],
          client_timeout: float) -> None:
    """Serve the REST API (OpenAPI at /docs) over the store."""
    from excp.cache import cache_root
    from server import ServeConfig, create_app
    from server.auth import load_tokens
    from server.config import parse_size
    from server.serving import serve as run_server

    config = ServeConfig(
        store=store, tokens=load_tokens(host, tokens_file, os.environ.get("EXCP_TOKENS")),
        max_body=parse_size(max_body, "--max-body"),
        cache_dir=Path(cache_dir) if cache_dir else cache_root() / "serve",
        cache_bytes=parse_size(cache_size, "--cache-size"), workers=workers,
        allowed_factories=allow_factory, client_timeout=client_timeout)
    app = create_app(config)
    click.echo(f"excp: serving {app.state.services.store.url} on http://{host}:{port} (docs at /docs)",
               err=True)
    run_server(app, host, port, config.client_timeout)
