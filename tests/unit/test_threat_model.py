"""docs/threat-model.md: every claim names a test, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "threat-model.md"
# `tests/file.py::test_name` (a file and a test) or `::test_name` (the same file as before).
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def _claim_rows() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## What each actor can and cannot do", 1)[1].split("## Known limits")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row for row in rows if not row.startswith("| threat |")]  # each table's header


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_claim_names_a_test_that_exists() -> None:
    rows = _claim_rows()
    assert len(rows) >= 20
    for row in rows:
        shown_by = row.rstrip(" |").rsplit(" | ", 1)[1]
        current: Path | None = None
        named = 0
        for match in REFERENCE.finditer(shown_by):
            file, name = match.groups()
            if file:
                current = ROOT / file
                assert current.is_file(), f"{file} does not exist (row: {row[:60]})"
            if name:
                assert current is not None, f"::{name} names no file (row: {row[:60]})"
                assert name in _test_names(current), f"{current.name}::{name} does not exist"
                named += 1
            elif file:
                named += 1  # a whole test file
        assert named, f"a claim names no test: {row[:80]}"
