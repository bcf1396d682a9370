"""teepsi: multi-party private set intersection inside an attested enclave.

The main API, re-exported here lazily (``import teepsi`` loads no gRPC, polars or
cryptography until a name is used)::

    import teepsi

    policy = teepsi.Policy.load("dynamic_config.json")
    table = teepsi.read_table(teepsi.TableSpec(path=Path("customers.csv"), ...))
    result = teepsi.run_party(teepsi.PartyConfig(host=..., policy=policy, ...), table)

    running = teepsi.start_server(teepsi.ServerConfig(...))

Every error teepsi raises on purpose is a :class:`TeepsiError`. The packages below hold the
rest: :mod:`teepsi.client`, :mod:`teepsi.server`, :mod:`teepsi.contract`,
:mod:`teepsi.attestation`, :mod:`teepsi.engine`; docs/architecture.md draws how they stand.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from teepsi._version import __version__
from teepsi.errors import TeepsiError

if TYPE_CHECKING:
    from teepsi.attestation.policy import Policy, PolicyError
    from teepsi.client import PartyConfig, PartyResult, PsiClientError, run_party
    from teepsi.contract.spec import JobSpec, SpecError
    from teepsi.engine.tables import TableError, TableFormat, TableSpec, read_table
    from teepsi.server import ServerConfig, run_server, start_server
    from teepsi.server.config import ServerConfigError

#: Where each public name lives; resolved on first use (PEP 562).
_EXPORTS = {
    "Policy": "teepsi.attestation.policy",
    "PolicyError": "teepsi.attestation.policy",
    "PartyConfig": "teepsi.client",
    "PartyResult": "teepsi.client",
    "PsiClientError": "teepsi.client",
    "run_party": "teepsi.client",
    "TableSpec": "teepsi.engine.tables",
    "TableFormat": "teepsi.engine.tables",
    "TableError": "teepsi.engine.tables",
    "read_table": "teepsi.engine.tables",
    "ServerConfig": "teepsi.server",
    "ServerConfigError": "teepsi.server.config",
    "start_server": "teepsi.server",
    "run_server": "teepsi.server",
    "JobSpec": "teepsi.contract.spec",
    "SpecError": "teepsi.contract.spec",
}

__all__ = [
    "JobSpec",
    "PartyConfig",
    "PartyResult",
    "Policy",
    "PolicyError",
    "PsiClientError",
    "ServerConfig",
    "ServerConfigError",
    "SpecError",
    "TableError",
    "TableFormat",
    "TableSpec",
    "TeepsiError",
    "__version__",
    "read_table",
    "run_party",
    "run_server",
    "start_server",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'teepsi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
