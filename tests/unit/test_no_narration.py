"""Code, configs and tests say what things are, not the history of how they came to be: no issue numbers in them
(the issue tracker and docs/ keep the history; measured numbers live in docs/benchmarks.md and docs/frontier.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("superblock", "configs", "tests", "scripts", "benchmarks", "experiments")
TOP = ("train.py", "evaluate.py", "export.py")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+\b", re.IGNORECASE)


def _sources() -> list[Path]:
    files = [ROOT / name for name in TOP]
    for folder in FOLDERS:
        for ext in ("*.py", "*.yaml", "*.sh"):
            files += sorted((ROOT / folder).rglob(ext))
    return [f for f in files if f.is_file() and f.resolve() != Path(__file__).resolve()]


def test_the_scan_sees_the_code():
    names = {f.name for f in _sources()}
    assert {"train.py", "bsr_linear.py", "gpu_check.sh", "smollm2_sparse.yaml"} <= names


@pytest.mark.parametrize("text", ["(issue 27)", "issue #20's", "Issues 12"])
def test_the_pattern_finds_issue_numbers(text):
    assert ISSUE.search(text)


def test_no_issue_numbers_in_code_configs_or_tests():
    found = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in _sources()
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert not found, "issue numbers in code (say what the thing is; history goes in docs/):\n" + "\n".join(found)
