"""The documentation runs as written: README.md and docs/*.md.

Every fenced block whose info string is ``bash`` is run: the blocks of a page in page
order, each by ``bash -euo pipefail``, all in one temporary directory per page, so a
file one block makes (a checkpoint, a store, a tokens file) is there for the next.
That directory is what the pages assume: a checkout of the repository (``examples/``
and ``benchmarks/`` are linked in) with no ``EXCP_STORE``, ``EXCP_SERVER`` or
``EXCP_TOKEN`` set, and a private ``EXCP_CACHE`` and ``TMPDIR``.

A line that starts ``excp serve`` is not given to bash: the test starts that server
itself in the page's directory (in the background, as the page's ``&`` says), waits
until it answers ``/healthz``, and stops it when the page is done. Every port a page
names (``127.0.0.1:N``, ``localhost:N``, ``--port N``; ``excp serve`` alone means
8080) is replaced on the whole page by a free port, the same one for the same N.

Blocks with any other info string are never run: ``console`` holds commands that need
what a test cannot have (installs from the network, the whole suite, a GPU, Docker,
an S3 server, long benchmarks), ``text`` holds output. Their ``excp`` commands are
still parsed by the CLI, and the options of their ``python benchmarks/X.py`` commands
checked against the script, so they cannot drift from the code either.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import click
import pytest

from excp import cli

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PORT = re.compile(r"(?<=127\.0\.0\.1:)\d{2,5}\b|(?<=localhost:)\d{2,5}\b|(?<=--port )\d{2,5}\b")
TEAM_PHRASES = ["this machine", "this session", "no gpu was lent", "the gpu issue", "shared/design.md",
                "design.md §", "ticket"]


@dataclass
class Block:
    page: Path
    info: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXCP_STORE", "EXCP_SERVER", "EXCP_TOKEN", "EXCP_TOKENS")}
    env["EXCP_CACHE"] = str(scratch / "cache")
    (scratch / "tmp").mkdir()
    env["TMPDIR"] = str(scratch / "tmp")  # what the examples make with tempfile goes with the test
    env["PYTHONUNBUFFERED"] = "1"
    # One thread per process: the models are small, and on a busy machine torch's
    # spinning OpenMP threads make them 10-50x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Page:
    """One page's working directory, environment, ports and servers."""

    def __init__(self, page: Path, work: Path) -> None:
        self.page, self.work = page, work
        work.mkdir()
        for name in ("examples", "benchmarks"):
            (work / name).symlink_to(ROOT / name)
        self.env = _env(work.parent)
        self.ports: dict[str, str] = {}
        self.servers: list[subprocess.Popen] = []
        self.logs: list = []

    def port(self, match: re.Match) -> str:
        return self.ports.setdefault(match.group(0), str(_free_port()))

    def run(self, block: Block) -> None:
        script: list[str] = []
        for line in PORT.sub(self.port, block.text).splitlines():
            if line.lstrip().startswith("excp serve"):
                self._bash(script, block)
                script = []
                self._serve(line, block)
            else:
                script.append(line)
        self._bash(script, block)

    def _bash(self, lines: list[str], block: Block) -> None:
        if not any(line.strip() for line in lines):
            return
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (f"{block.where}: the block failed (exit {done.returncode})\n"
                                      f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")

    def _serve(self, line: str, block: Block) -> None:
        args = shlex.split(line, comments=True)
        if args and args[-1] == "&":
            args.pop()
        if "--port" not in args:
            args += ["--port", self.ports.setdefault("8080", str(_free_port()))]
        port = args[args.index("--port") + 1]
        log = open(self.work.parent / f"serve-{port}.log", "wb")  # closed with the page
        self.logs.append(log)
        server = subprocess.Popen(args, cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.servers.append(server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, (f"{block.where}: `{' '.join(args)}` exited:\n"
                                           f"{Path(log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"{block.where}: `{' '.join(args)}` did not answer /healthz within 60 s")

    def close(self) -> None:
        for server in self.servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
        for log in self.logs:
            log.close()


RUNNABLE = [p for p in PAGES if any(b.info == "bash" for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[_rel(p) for p in RUNNABLE])
def test_the_pages_commands_run(page: Path, tmp_path: Path) -> None:
    state = Page(page, tmp_path / "work")
    try:
        for block in blocks(page):
            if block.info == "bash":
                state.run(block)
    finally:
        state.close()


# --- what is not run is still checked ---------------------------------------------------

def _commands(text: str) -> list[list[str]]:
    """Simple commands of a block: lines joined at trailing backslashes, split at
    ``&&``, ``;`` and ``|``; heredoc bodies and comment-only lines left out."""
    commands, heredoc = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        words = shlex.split(line, comments=True)
        if "<<" in line:
            heredoc = re.search(r"<<-?\s*['\"]?(\w+)", line).group(1)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", ";", "|", "||", "&"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return [c for c in commands if c]


def _check_excp(words: list[str], where: str) -> None:
    name, args = words[1], words[2:]
    command = cli.main.get_command(click.Context(cli.main), name)
    assert command is not None, f"{where}: `excp {name}` is not a command"
    with ExitStack() as stack:  # the files a command names exist where it runs, not here
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                stack.enter_context(mock.patch.object(param.type, "exists", False))
        try:
            command.make_context(f"excp {name}", list(args))
        except click.exceptions.Exit:
            pass
        except click.ClickException as exc:
            pytest.fail(f"{where}: `{shlex.join(words)}`: {exc.format_message()}")


def _check_script(words: list[str], where: str) -> None:
    script = next(w for w in words if w.endswith(".py"))
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    source = path.read_text()
    for word in words:
        if word.startswith("--") and script.startswith("benchmarks/"):
            option = word.split("=", 1)[0]
            assert f'"{option}"' in source, f"{where}: {script} has no option {option}"


def test_commands_that_are_not_run_still_fit_the_code() -> None:
    checked = 0
    for page in PAGES:
        for block in blocks(page):
            if block.info != "console":
                continue
            for words in _commands(block.text):
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words = words[1:]  # VAR=value command
                if words[:1] == ["excp"] and len(words) > 1:
                    _check_excp(words, block.where)
                    checked += 1
                elif any(w.endswith(".py") for w in words) and words[0] in ("python", "torchrun"):
                    _check_script(words, block.where)
                    checked += 1
    assert checked > 10


# --- the pages themselves ---------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.MULTILINE)}


def test_links_between_pages_resolve() -> None:
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no such heading)")
            elif ROOT.resolve() not in dest.resolve().parents and dest.resolve() != ROOT.resolve():
                broken.append(f"{_rel(page)}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_pages_speak_of_the_product_only() -> None:
    found = [f"{_rel(page)}: {phrase!r}" for page in PAGES for phrase in TEAM_PHRASES
             if phrase in page.read_text().lower()]
    assert not found, "team-internal wording:\n" + "\n".join(found)


def test_the_readme_set_up_is_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Set-up' section"
    fenced = FENCE.findall(section.group(1))
    assert len(fenced) == 1, "the set-up is one block"
    commands = [line for line in fenced[0][1].splitlines() if line.strip()]
    assert len(commands) == 2, "the set-up is exactly two commands"
    assert "excp demo" in commands[0]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == commands[1], ".ci/run must run exactly the README's test command"


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_cli_reference_names_every_command_and_option() -> None:
    reference = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## `excp (\w+)`\n(.*?)(?=^## |\Z)", reference, re.MULTILINE | re.DOTALL))
    missing = []
    for name, command in cli.main.commands.items():
        if name not in sections:
            missing.append(f"excp {name} (no '## `excp {name}`' section)")
            continue
        for param in command.params:
            if isinstance(param, click.Option):
                option = max(param.opts, key=len)
                if f"`{option}" not in sections[name]:
                    missing.append(f"excp {name} {option}")
    assert not missing, "docs/cli.md lacks:\n" + "\n".join(missing)
