"""Choosing an evidence provider by name, as the command line does."""

from __future__ import annotations

from pathlib import Path

from teepsi.attestation.evidence import EvidenceProvider, Role

PROVIDER_NAMES = ("sim", "gramine")


def make_provider(name: str, role: Role, *, gramine_root: Path | None = None) -> EvidenceProvider:
    """The evidence provider called ``name`` for an enclave acting as ``role``."""
    if name == "sim":
        from teepsi.attestation.measure import sim_identity
        from teepsi.attestation.sim import SimEvidenceProvider

        return SimEvidenceProvider(sim_identity(role))
    if name == "gramine":
        from teepsi.attestation.gramine import GramineEvidenceProvider

        if gramine_root is None:
            return GramineEvidenceProvider()
        return GramineEvidenceProvider(gramine_root)
    raise ValueError(f"unknown attestation {name!r}: expected one of {', '.join(PROVIDER_NAMES)}")
