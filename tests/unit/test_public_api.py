"""The public face: ``import teepsi`` gives the documented API, and every library error is a
TeepsiError (issue 12.4)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import teepsi
from teepsi.errors import TeepsiError

#: The documented API (docs/architecture.md, "The public face"). Changing it is an API change.
DOCUMENTED = {
    "__version__",
    "TeepsiError",
    # attestation policy
    "Policy",
    "PolicyError",
    # a data provider
    "PartyConfig",
    "PartyResult",
    "run_party",
    "PsiClientError",
    # tables
    "TableSpec",
    "TableFormat",
    "TableError",
    "read_table",
    # the server
    "ServerConfig",
    "ServerConfigError",
    "start_server",
    "run_server",
    # the contract
    "JobSpec",
    "SpecError",
}


def test_all_is_the_documented_api() -> None:
    assert set(teepsi.__all__) == DOCUMENTED


def test_every_exported_name_resolves() -> None:
    for name in teepsi.__all__:
        assert getattr(teepsi, name) is not None, name
    assert set(dir(teepsi)) >= DOCUMENTED


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = teepsi.nonexistent


def test_import_teepsi_is_lazy() -> None:
    # `import teepsi` must stay cheap: no grpc, polars or cryptography until a name is used
    code = (
        "import sys, teepsi; "
        "heavy = [m for m in ('grpc', 'polars', 'numpy', 'cryptography') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def _library_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(teepsi.__path__, prefix="teepsi."):
        if info.name.endswith(("_pb2", "_pb2_grpc")) or info.name == "teepsi.__main__":
            continue
        names.append(info.name)
    return names


def test_every_library_error_is_a_teepsi_error() -> None:
    offenders = []
    for name in _library_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not issubclass(value, TeepsiError)
            ):
                offenders.append(f"{name}.{attr}")
    assert offenders == []


def test_library_configs_default_to_real_hardware() -> None:
    """As on the command line: simulated attestation only when asked for (fail closed)."""
    import dataclasses

    for config in (teepsi.PartyConfig, teepsi.ServerConfig):
        fields = {f.name: f for f in dataclasses.fields(config)}
        assert fields["attestation"].default == "gramine", config
        assert fields["allow_simulated"].default is False, config
