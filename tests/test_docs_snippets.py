"""Every ``python`` code block in README.md and docs/ runs, exactly as written.

The blocks of one Markdown file run in order in one fresh interpreter with a shared namespace, as a reader pastes
them. The working directory is a scratch copy of the repository's layout (links to its folders), so ``../shared/data``
paths resolve as they do from the repository root and files the snippets write land in ``tmp_path``. Tracebacks give
the Markdown file and line.

A block that cannot run on a machine without the user's own files is preceded by ``<!-- not-run: REASON -->``; the
reason is mandatory and the number of such blocks is capped, so this escape cannot quietly grow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_shared, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<why>.*?)\s*-->")
MAX_NOT_RUN = 4

_RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for b in blocks:
    code = "\\n" * b["line"] + b["code"]  # tracebacks show the Markdown line numbers
    try:
        exec(compile(code, b["file"], "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"SNIPPET FAILED: {b['file']} block starting at line {b['line']}", file=sys.stderr)
        sys.exit(1)
"""


def python_blocks(path: Path, root: Path = ROOT) -> tuple[list[dict], list[dict]]:
    """The ``python`` fenced blocks of one Markdown file: (blocks to run, blocks marked not-run)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    run, skipped = [], []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
            block = {"file": str(path.relative_to(root)), "line": start, "code": "\n".join(body) + "\n"}
            marker = NOT_RUN.search(prev)
            (skipped if marker else run).append({**block, "why": marker.group("why") if marker else ""})
        i += 1
    return run, skipped


FILES = [p for p in MARKDOWN if python_blocks(p)[0]]


def _scratch_tree(tmp_path: Path) -> Path:
    """``tmp/project`` with links to the repository's top-level entries, and ``tmp/shared/data`` -> the real data."""
    project = tmp_path / "project"
    project.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("runs", "outputs", "out"):
            continue
        (project / entry.name).symlink_to(entry)
    if shared_data_dir().is_dir():
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(shared_data_dir())
    return project


@pytest.mark.parametrize("md", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_python_snippets_run_as_written(md, tmp_path):
    blocks, _ = python_blocks(md)
    if any("../shared" in b["code"] for b in blocks):
        require_shared(".")
    project = _scratch_tree(tmp_path)
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec)], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{md.name}: a snippet failed\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_not_run_markers_are_few_and_explained():
    skipped = [b for p in MARKDOWN for b in python_blocks(p)[1]]
    for b in skipped:
        assert len(b["why"]) >= 20, f"{b['file']}:{b['line']}: a not-run marker must say why the block cannot run"
    assert len(skipped) <= MAX_NOT_RUN, f"{len(skipped)} blocks are marked not-run: {[b['file'] for b in skipped]}"


def test_snippet_collector_sees_blocks_and_markers(tmp_path):
    """The collector finds fenced python blocks, their first line, and a marker on the line before."""
    md = tmp_path / "probe.md"
    md.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not-run: needs a checkpoint from the user -->\n```python\ny\n```\n"
    )
    run, skipped = python_blocks(md, root=tmp_path)
    assert [(b["line"], b["code"]) for b in run] == [(3, "x = 1\n")]
    assert [b["why"] for b in skipped] == ["needs a checkpoint from the user"]
