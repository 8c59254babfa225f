"""The examples in examples/ are the documentation's: each is shown verbatim in README.md
or a page of docs/, every ```python block there is one of them, and the plain training
loop runs (twice: the second run resumes from the first one's checkpoints). The
framework examples run in test_callbacks.py and test_dcp.py; the docs' commands that
run the examples, in test_docs.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from excp import api

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _docs() -> str:
    return "\n".join(page.read_text() for page in PAGES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_docs_show_the_example_verbatim(example: Path) -> None:
    assert example.read_text().strip() in _docs(), \
        f"no page of README.md or docs/ holds {example.name} as it is: paste the file into its section"


def test_every_python_block_is_an_example() -> None:
    examples = {p.read_text().strip() for p in EXAMPLES}
    strays = [f"{page.relative_to(ROOT)}: a ```python block starting {block.strip().splitlines()[0]!r}"
              for page in PAGES for block in PYTHON_BLOCK.findall(page.read_text())
              if block.strip() not in examples]
    assert not strays, ("a ```python block must be a file of examples/ (so it runs); run shorter code in "
                        "a ```bash block as python - <<'EOF':\n" + "\n".join(strays))


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
