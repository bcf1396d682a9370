"""docs/architecture.md draws the layers the import linter enforces; the two must agree, and
the linter must catch an arrow drawn the wrong way."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
CONTRACTS = ROOT / ".importlinter"


def _contracts() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(CONTRACTS)
    return parser


def test_the_whiteboard_draws_the_linted_layers() -> None:
    drawn = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert drawn, "docs/architecture.md has no ```layers block"
    linted = _contracts()["importlinter:contract:layers"]["layers"]
    assert drawn.group(1).split() == linted.split()


def test_every_contract_is_named_on_the_whiteboard() -> None:
    text = DOC.read_text()
    for section in _contracts().sections():
        if section.startswith("importlinter:contract:"):
            assert f"**{section.split(':')[-1]}**" in text, section


def test_every_package_has_a_room_on_the_whiteboard() -> None:
    text = DOC.read_text()
    src = ROOT / "src" / "teepsi"
    for package in sorted(p.parent.name for p in src.glob("*/__init__.py")):
        assert f"`teepsi.{package}`" in text, package


def test_the_linter_refuses_an_arrow_the_wrong_way(tmp_path: Path) -> None:
    """A copy of the tree where the contract imports the engine: the linter must fail."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CONTRACTS, copy / ".importlinter")
    spec = copy / "src" / "teepsi" / "contract" / "outputs.py"
    spec.write_text(spec.read_text() + "\nimport teepsi.engine.records  # wrong way\n")
    linter = str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run(
        [linter, "--no-cache"],
        cwd=copy,
        env={"PYTHONPATH": str(copy / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0, run.stdout
    assert "teepsi.contract.outputs -> teepsi.engine.records" in run.stdout
