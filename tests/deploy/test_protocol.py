"""The generated gRPC code is current with teepsi.proto (regenerate with `make proto`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["teepsi_pb2.py", "teepsi_pb2.pyi", "teepsi_pb2_grpc.py", "teepsi_pb2_grpc.pyi"]


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    if shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mypy-protobuf is missing: install the dev extras (pip install -e '.[dev]')")
    src = tmp_path / "src" / "teepsi" / "protocol"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "src/teepsi/protocol/teepsi.proto", src)
    env_path = f"{Path(sys.executable).parent}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "src",
            "--python_out=src",
            "--grpc_python_out=src",
            "--mypy_out=src",
            "--mypy_grpc_out=src",
            "src/teepsi/protocol/teepsi.proto",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={"PATH": env_path},
    )
    for name in GENERATED:
        fresh = (src / name).read_text()
        committed = (ROOT / "src/teepsi/protocol" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_package_is_teepsi_v1():
    from teepsi.protocol import teepsi_pb2

    assert teepsi_pb2.DESCRIPTOR.package == "teepsi.v1"
    assert "Psi" in teepsi_pb2.DESCRIPTOR.services_by_name
