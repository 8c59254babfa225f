"""The ``excp`` command through click's test runner, plus one real run of the installed
console script. Every error must be one ``excp: error [<code>]: ...`` line on stderr and
the exit code the module docstring of ``excp.cli`` documents."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from excp import api
from excp.chain import Chain
from excp.cli import main
from excp.cli_usage import MISSING_FIXES
from excp.codec.params import CodecParams
from excp.store import LocalStore
from tests.serve_fixtures import free_port

PUSHED = re.compile(r"^step (\d+) (committed|already stored \(no-op\)): (keyframe|link \d+), "
                    r"raw ([\d.]+ [KMGT]?B), stored ([\d.]+ [KMGT]?B), ratio ([\d.]+)x$")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store: Path):
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(main, list(args), env={"EXCP_STORE": str(store), **(env or {})})
    return invoke


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    """Three checkpoint files of one small AdamW run, steps 2, 4 and 6 (made once)."""
    folder, out = tmp_path_factory.mktemp("checkpoints"), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    try:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                        torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            x = torch.randn(128, 32)
            y = torch.tanh(x @ torch.randn(32, 32))
        for step in (2, 4, 6):
            for _ in range(2):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "meta": {"note": "cli", "lr": 3e-3}}
            path = folder / f"ckpt-{step}.pt"
            torch.save(ckpt, path)
            out.append((path, torch.load(path, weights_only=True)))
    finally:
        torch.set_num_threads(threads)
    return out


def _ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def _error(result: Result, exit_code: int, code: str, *, quiet: bool = True) -> str:
    """``quiet``: nothing at all on stdout."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"excp: error [{code}]: "), lines[0]
    if quiet:
        assert result.stdout == "", result.stdout
    return lines[0]


def _push_all(cli, checkpoints, run: str = "r") -> list[str]:
    return [_ok(cli("push", str(path), "--run", run)).strip() for path, _ in checkpoints]


def _archives(store: Path, run: str = "r") -> list[Path]:
    return sorted((store / "runs" / run / "archives").glob("*.excp"))


# --- the happy path ---------------------------------------------------------------------


def test_push_prints_step_sizes_and_ratio_and_repush_is_a_noop(cli, checkpoints, store) -> None:
    lines = _push_all(cli, checkpoints)
    commits = api.list_commits("r", str(store))
    assert [c.step for c in commits] == [2, 4, 6]
    for line, commit in zip(lines, commits, strict=True):
        match = PUSHED.match(line)
        assert match, line
        step, state, kind, _raw, _stored, ratio = match.groups()
        assert int(step) == commit.step and state == "committed"
        assert kind == ("keyframe" if commit.keyframe else f"link {commit.depth}")
        assert ratio == f"{commit.ratio:.1f}"
    assert commits[0].keyframe and not commits[1].keyframe

    again = _ok(cli("push", str(checkpoints[1][0]), "--run", "r")).strip()
    match = PUSHED.match(again)
    assert match and match.group(1) == "4" and match.group(2) == "already stored (no-op)"
    assert len(api.list_commits("r", str(store))) == 3


def test_restore_writes_a_file_torch_loads_weights_only(cli, checkpoints, store, tmp_path) -> None:
    _push_all(cli, checkpoints)
    out = tmp_path / "restored.pt"
    assert "step 4" in _ok(cli("restore", "--run", "r", "--step", "4", "-o", str(out)))
    restored = torch.load(out, weights_only=True)
    original = checkpoints[1][1]
    assert restored["step"] == 4 and restored["meta"] == original["meta"]
    assert restored["model"].keys() == original["model"].keys()
    by_api = api.load_dict(api.restore("r", 4, store=str(store)))
    for name, tensor in original["model"].items():
        got = restored["model"][name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, by_api["model"][name]), name  # the CLI is a shell over the API
    weight = original["model"]["0.weight"]
    error = (restored["model"]["0.weight"] - weight).norm() / weight.norm()
    assert 0 < float(error) < 0.1  # lossy, but close
    assert restored["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]

    latest = tmp_path / "latest.pt"
    _ok(cli("restore", "--run", "r", "-o", str(latest)))
    assert torch.load(latest, weights_only=True)["step"] == 6


def test_ls_lists_runs_and_a_runs_steps(cli, checkpoints, store) -> None:
    _push_all(cli, checkpoints, "alpha")
    _ok(cli("push", str(checkpoints[0][0]), "--run", "beta"))
    assert _ok(cli("ls")).splitlines() == ["alpha", "beta"]

    table = _ok(cli("ls", "--run", "alpha")).splitlines()
    assert table[0].split() == ["step", "kind", "parent", "raw", "stored", "ratio", "exact"]
    rows = [line.split() for line in table[1:]]
    assert [row[0] for row in rows] == ["2", "4", "6"]
    assert [row[1] for row in rows] == ["keyframe", "link", "link"]
    assert [row[2] for row in rows] == ["-", "2", "4"]
    assert all(row[-2].endswith("x") and row[-1] == "-" for row in rows)


def test_inspect_an_archive_and_a_stored_step(cli, checkpoints, store) -> None:
    _push_all(cli, checkpoints)
    first = _archives(store)[0]
    text = _ok(cli("inspect", str(first))).splitlines()
    assert text[0] == "run r step 2 layout torch_dict keyframe"
    assert json.loads(text[1].removeprefix("params "))["mode"] == "excp"
    assert any(line.startswith("0.weight ") and " adam " in line for line in text)

    text = _ok(cli("inspect", "--run", "r", "--step", "4")).splitlines()
    assert text[0] == "run r step 4 layout torch_dict link of 2"

    info = json.loads(_ok(cli("inspect", "--run", "r", "--step", "6", "--json")))
    assert info["header"]["step"] == 6 and info["header"]["parent"] == 4
    assert info["commit"]["step"] == 6 and not info["commit"]["keyframe"]
    names = {unit["name"] for unit in info["units"]}
    assert {"0.weight", "3.bias"} <= names
    weight = next(u for u in info["units"] if u["name"] == "0.weight")
    assert weight["codec"] == "adam"
    assert {"wcodes", "vcodes", "mcodes", "vrow", "vcol"} <= set(weight["streams"])
    assert weight["meta"]["q"] > 0 and "mask" not in weight["streams"]

    as_file = json.loads(_ok(cli("inspect", str(first), "--json")))
    assert as_file["header"]["keyframe"] is True and "commit" not in as_file


def test_rebuild_writes_one_file_per_step_and_verify_says_ok(cli, checkpoints, tmp_path) -> None:
    _push_all(cli, checkpoints)
    out = tmp_path / "rebuilt"
    assert "wrote 3 checkpoints" in _ok(cli("rebuild", "--run", "r", "-o", str(out)))
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"step-{s:012d}.pt" for s in (2, 4, 6)]
    assert [torch.load(out / f, weights_only=True)["step"] for f in files] == [2, 4, 6]

    line = _ok(cli("verify", "--run", "r")).strip()
    assert re.fullmatch(r"ok: 3 checkpoints, [\d.]+ [KMG]?B verified", line), line


def test_installed_console_script(checkpoints, store, tmp_path) -> None:
    """The entry point in pyproject.toml really starts the CLI."""
    script = Path(sys.executable).with_name("excp")
    command = str(script) if script.exists() else shutil.which("excp")
    assert command, "the excp console script is not installed: pip install -e ."
    api.push(checkpoints[0][1], "sub", store=str(store))
    env = {**os.environ, "EXCP_STORE": str(store), "EXCP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([command, "ls", "--run", "sub"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[0].split()[0] == "step" and rows[1].split()[:3] == ["2", "keyframe", "-"]
    failed = subprocess.run([command, "ls", "--run", "missing"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert failed.returncode == 3 and failed.stderr.startswith("excp: error [not_found]: ")


# --- errors: one line, the documented exit code ------------------------------------------


def test_not_a_checkpoint_exits_2(cli, tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    line = _error(cli("push", str(junk), "--run", "r", "--step", "1"), 2, "invalid_input")
    assert "junk.pt" in line and "not a checkpoint" in line
    lst = tmp_path / "list.pt"
    torch.save([torch.ones(2)], lst)
    _error(cli("push", str(lst), "--run", "r", "--step", "1"), 2, "invalid_input")


def test_unknown_run_exits_3(cli, tmp_path, checkpoints) -> None:
    _push_all(cli, checkpoints[:1])
    line = _error(cli("restore", "--run", "nope", "-o", str(tmp_path / "x.pt")), 3, "not_found")
    assert "'nope'" in line
    _error(cli("ls", "--run", "nope"), 3, "not_found", quiet=False)
    _error(cli("verify", "--run", "nope"), 3, "not_found")
    _error(cli("restore", "--run", "r", "--step", "99", "-o", str(tmp_path / "y.pt")), 3, "not_found")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_conflicting_step_exits_4(cli, checkpoints) -> None:
    _push_all(cli, checkpoints[:2])
    line = _error(cli("push", str(checkpoints[2][0]), "--run", "r", "--step", "4"), 4, "conflict")
    assert "step 4" in line
    _error(cli("push", str(checkpoints[2][0]), "--run", "r", "--step", "3"), 4, "conflict")


def test_corrupted_archive_exits_5_and_newer_version_exits_6(cli, checkpoints, store, tmp_path) -> None:
    _push_all(cli, checkpoints[:2])
    first, second = _archives(store)
    data = bytearray(second.read_bytes())
    data[40] ^= 0x10  # inside the data section: a chunk's checksum fails
    second.write_bytes(bytes(data))
    line = _error(cli("verify", "--run", "r"), 5, "corrupt_data")
    assert "step 4" in line
    _error(cli("restore", "--run", "r", "--step", "4", "-o", str(tmp_path / "a.pt")), 5, "corrupt_data")
    _ok(cli("restore", "--run", "r", "--step", "2", "-o", str(tmp_path / "b.pt")))

    data = bytearray(first.read_bytes())
    data[8:12] = (2).to_bytes(4, "little")
    first.write_bytes(bytes(data))
    _error(cli("restore", "--run", "r", "--step", "2", "-o", str(tmp_path / "c.pt")), 6,
           "unsupported_version")
    _error(cli("inspect", str(first)), 6, "unsupported_version")


def test_bad_run_name_exits_2(cli, checkpoints) -> None:
    line = _error(cli("push", str(checkpoints[0][0]), "--run", "bad name/.."), 2, "invalid_input")
    assert "invalid run name" in line
    _error(cli("ls", "--run", "-leading-dash"), 2, "invalid_input", quiet=False)


def test_ls_of_a_missing_run_prints_nothing_on_stdout(cli) -> None:
    _error(cli("ls", "--run", "nope"), 3, "not_found")


def test_rebuild_into_a_non_empty_dir_exits_2(cli, checkpoints, tmp_path) -> None:
    _push_all(cli, checkpoints[:1])
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _error(cli("rebuild", "--run", "r", "-o", str(out)), 2, "invalid_input")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_init_seed_without_model_factory_is_a_usage_error(cli, checkpoints, tmp_path) -> None:
    line = _error(cli("push", str(checkpoints[0][0]), "--run", "r", "--init-seed", "1"), 2, "invalid_input")
    assert line.endswith("--init-seed and --model-factory go together: give both, or neither "
                         "(see excp push --help)")
    line = _error(cli("restore", "--run", "r", "--init-seed", "1", "-o", str(tmp_path / "z.pt")), 2,
                  "invalid_input")
    assert "go together" in line and "(see excp restore --help)" in line


def test_restore_on_an_unavailable_device_is_a_clear_error(tmp_path) -> None:
    import torch

    from excp import api
    from excp.errors import InvalidInput

    api.push({"w": torch.randn(4, 4)}, "dev", step=1, store=str(tmp_path))
    if torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="does not exist"):
            api.restore("dev", 1, store=str(tmp_path), device=f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(InvalidInput, match="CUDA is not available"):
            api.restore("dev", 1, store=str(tmp_path), device="cuda")
    with pytest.raises(InvalidInput, match="unknown device"):
        api.restore("dev", 1, store=str(tmp_path), device="gpu0")


def test_codec_options_pick_the_rule_and_the_quality(cli, checkpoints) -> None:
    first, _ = checkpoints[0]
    ratio = {}
    for run, options in {"fine": ["--lr-step", "2", "--m-step", "0.25", "--v-step", "1"],
                         "coarse": ["--lr-step", "32", "--m-step", "2", "--v-step", "4"],
                         "uniform": ["--weight-rule", "uniform", "--weight-step", "3"],
                         "paper": ["--weight-rule", "paper", "--weight-bits", "4"]}.items():
        match = PUSHED.match(_ok(cli("push", str(first), "--run", run, *options)).strip())
        assert match, run
        info = json.loads(_ok(cli("inspect", "--run", run, "--step", "2", "--json")))
        weight = next(u for u in info["units"] if u["name"] == "0.weight")
        assert ("mask" in weight["streams"]) == (run == "paper")
        assert weight["codec"] == ("excp" if run in ("paper", "uniform") else "adam")
        assert info["header"]["params"]["weight_rule"] == (run if run in ("paper", "uniform") else "adam")
        ratio[run] = float(match.group(6))
    assert ratio["coarse"] > ratio["fine"]


@pytest.mark.parametrize(("options", "message"), [
    (["--weight-step", "0"], "weight_step must be in"),
    (["--keyframe-step", "-1"], "keyframe_step must be in"),
    (["--weight-rule", "median"], "invalid value for '--weight-rule'"),
    (["--lr-step", "0"], "lr_step must be in"),
    (["--v-step", "0"], "v_step must be an integer in 1..16"),
    (["--m-step", "-1"], "m_step must be in"),
])
def test_bad_codec_options_are_one_line_errors(cli, checkpoints, options, message) -> None:
    first, _ = checkpoints[0]
    result = cli("push", str(first), "--run", "bad", *options)
    assert result.exit_code == 2 and message in result.output, result.output


def test_two_restores_of_a_step_are_the_same_bytes(cli, checkpoints, tmp_path) -> None:
    """torch.save names a zip's inner folder after the file it writes; restores go
    through randomly named staging files, so this holds only if excp saves through an
    open file."""
    for path, _ in checkpoints:
        _ok(cli("push", str(path), "--run", "same"))
    _ok(cli("restore", "--run", "same", "--step", "4", "-o", str(tmp_path / "a.pt")))
    _ok(cli("restore", "--run", "same", "--step", "4", "-o", str(tmp_path / "other-name.pt")))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()


# --- usage errors: one line naming the problem and the fix ------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["push"], "missing argument 'PATH': give the checkpoint file or Hugging Face Trainer checkpoint "
               "directory to push (see excp push --help)"),
    (["push", "CHECKPOINT"], "missing option '--run': name the run with --run NAME (see excp push --help)"),
    (["restore", "--run", "r"], "missing option '--out': say where to write with --out PATH "
                                "(see excp restore --help)"),
    (["push", "CHECKPOINT", "--run", "r", "--preset", "best"],
     "invalid value for '--preset': 'best' is not one of 'paper', 'safe', 'default', 'max', 'lossless' "
     "(see excp push --help)"),
    (["push", "CHECKPOINT", "--run", "r", "--step", "x"],
     "invalid value for '--step': 'x' is not a valid integer (see excp push --help)"),
    (["ls", "--bogus"], "no such option '--bogus' (see excp ls --help)"),
    (["ls", "--rnu", "r"], "no such option '--rnu'; did you mean '--run'? (see excp ls --help)"),
    (["lst"], "no such command 'lst'; did you mean 'ls'? (see excp --help)"),
    (["nothing-like-it"], "no such command 'nothing-like-it' (see excp --help)"),
])
def test_usage_errors_are_one_line_with_the_fix(cli, checkpoints, args, expected) -> None:
    args = [str(checkpoints[0][0]) if a == "CHECKPOINT" else a for a in args]
    line = _error(cli(*args), 2, "invalid_input")
    assert line == f"excp: error [invalid_input]: {expected}"


def test_help_and_version_still_work(cli) -> None:
    assert _ok(cli("push", "--help")).startswith("Usage: excp push [OPTIONS] PATH")
    assert "Reconstruct a step of RUN" in _ok(cli("restore", "--help"))
    assert _ok(cli("--version")).startswith("excp, version ")
    bare = cli()  # no command: the group's help, as click shows it
    assert bare.exit_code == 2 and "Commands:" in bare.output and "excp: error" not in bare.output


def test_every_required_parameter_has_a_fix() -> None:
    required = {param.name for command in main.commands.values() for param in command.params
                if param.required}
    assert required and required <= set(MISSING_FIXES), required - set(MISSING_FIXES)


def test_a_store_path_that_is_a_file_is_refused_by_every_command(cli, checkpoints, tmp_path) -> None:
    file = tmp_path / "not-a-store.pt"
    file.write_bytes(b"x")
    for args in (["ls"], ["ls", "--run", "r"], ["push", str(checkpoints[0][0]), "--run", "r"],
                 ["restore", "--run", "r", "-o", str(tmp_path / "out.pt")], ["verify", "--run", "r"],
                 ["inspect", "--run", "r"], ["rebuild", "--run", "r", "-o", str(tmp_path / "out")], ["gc"]):
        line = _error(cli(*args, "--store", str(file)), 2, "invalid_input")
        assert line == (f"excp: error [invalid_input]: store path {file} is a file, not a store directory: "
                        "pass the directory that holds runs/ (or a new path, made on the first push)"), args
    assert file.read_bytes() == b"x"


def test_ls_of_an_empty_store_and_of_a_run_without_checkpoints_says_so(cli, store) -> None:
    result = cli("ls")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == (f"no runs in {store.as_uri()} yet: push one with "
                             f"`excp push CHECKPOINT --run NAME --store {store.as_uri()}`\n")
    Chain(LocalStore(store), "fresh").create(CodecParams(), None)  # as a push that died before committing
    result = cli("ls", "--run", "fresh")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == (f"run 'fresh' has no checkpoints yet: push one with "
                             f"`excp push CHECKPOINT --run fresh --store {store.as_uri()}`\n")
    assert _ok(cli("ls")) == "fresh\n"


def test_a_missing_run_names_the_store_and_how_to_list_it(cli, checkpoints, store) -> None:
    _push_all(cli, checkpoints[:1])
    line = _error(cli("verify", "--run", "nope"), 3, "not_found")
    assert line.endswith(f"run 'nope' does not exist in {store.as_uri()}: check the name with "
                         f"`excp ls --store {store.as_uri()}`")
    out = str(store.parent / "x.pt")
    line = _error(cli("restore", "--run", "r", "--step", "9", "-o", out), 3, "not_found")
    assert line.endswith(f"list its steps with `excp ls --store {store.as_uri()} --run r`")


def test_inspect_prints_whole_names_and_no_cut_checksums(cli, store) -> None:
    long_name = "model.layers.11.self_attention.query_key_value.weight"
    api.push({long_name: torch.randn(8, 8), "b": torch.zeros(8)}, "long", step=1, store=str(store))
    names = [unit["name"] for unit in json.loads(_ok(cli("inspect", "--run", "long", "--json")))["units"]]
    assert long_name in names
    table = _ok(cli("inspect", "--run", "long")).splitlines()
    assert table[2].split() == ["tensor", "codec", "dtype", "shape", "stored"]
    assert [line.split()[0] for line in table[3:3 + len(names)]] == names


@pytest.mark.parametrize(("write", "reason"), [
    (lambda path: path.write_text("hello"), "it is not a file torch.save wrote"),
    (lambda path: path.write_bytes(b""), "the file is empty"),
    (lambda path: torch.save({"when": datetime.date(2024, 1, 1)}, path),
     "it holds a pickled datetime.date, which excp does not unpickle (only tensors and plain Python "
     "values load safely)"),
    (lambda path: path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4)),
     "it is not a file torch.save wrote"),
])
def test_not_a_checkpoint_is_one_complete_line(cli, tmp_path, write, reason) -> None:
    path = tmp_path / "thing.pt"
    write(path)
    line = _error(cli("push", str(path), "--run", "r", "--step", "1"), 2, "invalid_input")
    assert line == (f"excp: error [invalid_input]: {path} is not a checkpoint: {reason}; excp accepts a "
                    "torch.save'd dict with 'model' and 'optimizer', a Hugging Face Trainer checkpoint "
                    "directory, or a bare state_dict")


def test_nothing_listening_at_the_server_is_one_line_at_once(cli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = _error(cli("ls", "--server", url), 7, "service_unavailable")
    assert line == (f"excp: error [service_unavailable]: cannot reach the excp service at {url}: connection "
                    "refused; start it with `excp serve` or check --server")
