"""Choosing an evidence provider by name, as the command line does."""

from __future__ import annotations

from pathlib import Path

from teepsi.attestation.evidence import EvidenceProvider, Role

PROVIDER_NAMES = ("sim", "gramine", "tdx")
#: The TEEs ``--attestation sim`` can simulate (``--sim-tee``).
SIM_TEES = ("sgx", "tdx")


def make_provider(
    name: str,
    role: Role,
    *,
    gramine_root: Path | None = None,
    sim_tee: str = "sgx",
    tsm_root: Path | None = None,
) -> EvidenceProvider:
    """The evidence provider called ``name`` for an enclave or VM acting as ``role``.

    ``sim_tee`` picks the simulated TEE for ``sim``; ``tsm_root`` replaces the
    configfs-tsm directory for ``tdx`` (tests).
    """
    if sim_tee not in SIM_TEES:
        raise ValueError(
            f"unknown simulated TEE {sim_tee!r}: expected one of {', '.join(SIM_TEES)}"
        )
    if name == "sim":
        if sim_tee == "tdx":
            from teepsi.attestation.measure import sim_td_identity
            from teepsi.attestation.sim import SimTdxEvidenceProvider

            return SimTdxEvidenceProvider(sim_td_identity(), role)
        from teepsi.attestation.measure import sim_identity
        from teepsi.attestation.sim import SimEvidenceProvider

        return SimEvidenceProvider(sim_identity(role))
    if name == "gramine":
        from teepsi.attestation.gramine import GramineEvidenceProvider

        if gramine_root is None:
            return GramineEvidenceProvider()
        return GramineEvidenceProvider(gramine_root)
    if name == "tdx":
        from teepsi.attestation.tdx import TdxEvidenceProvider

        if tsm_root is None:
            return TdxEvidenceProvider(role)
        return TdxEvidenceProvider(role, tsm_root)
    raise ValueError(f"unknown attestation {name!r}: expected one of {', '.join(PROVIDER_NAMES)}")
