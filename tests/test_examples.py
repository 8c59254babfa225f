"""The examples in examples/ are the README's: each is in it verbatim, and the plain
training loop runs (twice: the second run resumes from the first one's checkpoints).
The framework examples run in test_callbacks.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from excp import api

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_readme_shows_the_example_verbatim(example: Path) -> None:
    assert example.read_text().strip() in (ROOT / "README.md").read_text(), \
        f"README.md does not hold {example.name} as it is: paste the file into its section"


@pytest.mark.slow
def test_training_loop_example_runs_and_resumes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    runs = [subprocess.run([sys.executable, str(ROOT / "examples" / "training_loop.py"), str(store)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "resumed from step 0; saved 5 checkpoints" in runs[0].stdout
    assert "resumed from step 100; saved 5 checkpoints" in runs[1].stdout
    commits = api.list_commits("example-loop", str(store))
    assert [c.step for c in commits] == list(range(20, 201, 20))
    assert commits[5].parent == 100  # the resumed job coded against what it restored
    assert api.verify("example-loop", store=str(store)).checkpoints == 10
