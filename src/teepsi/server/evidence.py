"""What the server shows of itself: its RA-TLS certificate and collateral for its quote."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from teepsi.attestation.collateral import CollateralError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerEvidenceBundle:
    certificate_der: bytes
    collateral_json: str
    attestation: str
    certificate_sha256: bytes
    #: Fresh collateral for the server's own quote (refetched as it ages); None = fixed.
    collateral_source: Callable[[], str] | None = None

    def current_collateral(self) -> str:
        if self.collateral_source is None:
            return self.collateral_json
        try:
            return self.collateral_source()
        except CollateralError as exc:
            log.warning("no collateral to staple to the server certificate: %s", exc)
            return ""
