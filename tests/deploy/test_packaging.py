"""Packaging: runtime dependencies are ranges that fit the committed generated code, and
`pip install .` in a fresh venv brings only them (no development or benchmark tool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROTOCOL = ROOT / "src" / "teepsi" / "protocol"


def requirements(group: str | None = None) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in parsed}


def floor(requirement: Requirement) -> Version:
    (lower,) = [s for s in requirement.specifier if s.operator == ">="]
    return Version(lower.version)


def generated_grpc_version() -> Version:
    text = (PROTOCOL / "teepsi_pb2_grpc.py").read_text()
    return Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text)[1])  # type: ignore[index]


def generated_protobuf_version() -> Version:
    text = (PROTOCOL / "teepsi_pb2.py").read_text()
    return Version(re.search(r"# Protobuf Python Version: (\S+)", text)[1])  # type: ignore[index]


def test_runtime_dependencies_are_ranges_not_pins() -> None:
    for requirement in requirements().values():
        operators = {s.operator for s in requirement.specifier}
        assert "==" not in operators and "===" not in operators, requirement
    # dcap-qvl's verdicts are what the attestation tests check: any 0.7.x, never 0.8
    dcap = requirements()["dcap-qvl"].specifier
    assert "0.7.0" in dcap and "0.7.9" in dcap and "0.8.0" not in dcap
    grpc = requirements()["grpcio"].specifier
    assert "1.99.0" in grpc and "2.0.0" not in grpc


def test_grpc_and_protobuf_floors_are_what_the_generated_code_needs() -> None:
    """The generated stubs refuse older runtimes: a lower floor would install a broken teepsi,
    and regenerating with a newer grpcio-tools must move the floor with it."""
    assert floor(requirements()["grpcio"]) == generated_grpc_version()
    assert floor(requirements()["protobuf"]) == generated_protobuf_version()
    (tools,) = requirements("dev")["grpcio-tools"].specifier
    assert tools.operator == "==" and Version(tools.version) == generated_grpc_version()


def test_no_tool_is_a_runtime_dependency() -> None:
    runtime = set(requirements())
    for group in PYPROJECT["project"]["optional-dependencies"]:
        assert not runtime & set(requirements(group)), group


@pytest.mark.slow
def test_pip_install_brings_only_runtime_dependencies(tmp_path: Path) -> None:
    """A fresh venv, `pip install .` of a copy of the sources (the pip cache may serve the
    wheels), then: no dev or bench package is installed, and the installed teepsi runs."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {canonicalize_name(d["name"]) for d in json.loads(listing.stdout)}
    assert set(requirements()) <= names
    tools = set()
    for group in PYPROJECT["project"]["optional-dependencies"]:
        tools |= set(requirements(group))
    assert not names & tools, sorted(names & tools)
    # the runtime set is complete: every module imports and the command line works
    teepsi = venv / "bin" / "teepsi"
    measured = subprocess.run(
        [str(teepsi), "measure", "--attestation", "sim"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["sgx_mrs"]
    imports = subprocess.run(
        [
            str(python),
            "-c",
            "import pkgutil, importlib, teepsi; "
            "[importlib.import_module(m.name) for m in "
            "pkgutil.walk_packages(teepsi.__path__, 'teepsi.') if m.name != 'teepsi.__main__']",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imports.returncode == 0, imports.stderr
    # the README's figure for the install size (du -sh of site-packages) is still true
    site = next((venv / "lib").glob("python3*/site-packages"))
    du = subprocess.run(["du", "-sk", str(site)], capture_output=True, text=True, check=True)
    measured_mb = int(du.stdout.split()[0]) / 1024
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"runtime dependencies take about (\d+) MB", readme)
    assert stated, "README.md no longer states the install size"
    assert abs(measured_mb - int(stated[1])) <= 0.25 * int(stated[1]), measured_mb
