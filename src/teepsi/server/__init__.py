"""The PSI server: jobs and their lifecycle, and the gRPC service over them.

Start one from Python with ``teepsi.server.start_server(ServerConfig(...))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teepsi.server.app import run_server, start_server
    from teepsi.server.config import ServerConfig

__all__ = ["ServerConfig", "run_server", "start_server"]


def __getattr__(name: str) -> Any:
    # Lazy, so the pure job logic imports without gRPC and attestation.
    if name == "ServerConfig":
        from teepsi.server import config

        return config.ServerConfig
    if name in __all__:
        from teepsi.server import app

        return getattr(app, name)
    raise AttributeError(name)
