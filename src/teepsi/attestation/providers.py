"""The registry of evidence providers: one table the CLI's choices and the library share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teepsi.attestation.evidence import EvidenceProvider, Role
from teepsi.errors import TeepsiError

#: The TEEs the ``sim`` provider can simulate.
SIM_TEES = ("sgx", "tdx")


class UnknownProvider(TeepsiError, ValueError):
    """No provider (or simulated TEE) of that name; the message lists the known ones."""


@dataclass(frozen=True)
class ProviderOptions:
    """What a provider may need besides the role; each provider reads its own."""

    gramine_root: Path | None = None
    sim_tee: str = "sgx"
    tsm_root: Path | None = None


def _sim(role: Role, options: ProviderOptions) -> EvidenceProvider:
    from teepsi.attestation.measure import sim_identity, sim_td_identity
    from teepsi.attestation.sim import SimEvidenceProvider, SimTdxEvidenceProvider

    if options.sim_tee == "tdx":
        return SimTdxEvidenceProvider(sim_td_identity(), role)
    return SimEvidenceProvider(sim_identity(role))


def _gramine(role: Role, options: ProviderOptions) -> EvidenceProvider:
    from teepsi.attestation.gramine import GramineEvidenceProvider

    if options.gramine_root is None:
        return GramineEvidenceProvider()
    return GramineEvidenceProvider(options.gramine_root)


def _tdx(role: Role, options: ProviderOptions) -> EvidenceProvider:
    from teepsi.attestation.tdx import TdxEvidenceProvider

    if options.tsm_root is None:
        return TdxEvidenceProvider(role)
    return TdxEvidenceProvider(role, options.tsm_root)


#: Provider name -> factory; imports are lazy so that naming a provider costs nothing.
PROVIDERS: dict[str, Callable[[Role, ProviderOptions], EvidenceProvider]] = {
    "sim": _sim,
    "gramine": _gramine,
    "tdx": _tdx,
}
PROVIDER_NAMES = tuple(PROVIDERS)


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
        raise UnknownProvider(
            f"unknown simulated TEE {sim_tee!r}: expected one of {', '.join(SIM_TEES)}"
        )
    factory = PROVIDERS.get(name)
    if factory is None:
        raise UnknownProvider(
            f"unknown attestation {name!r}: expected one of {', '.join(PROVIDER_NAMES)}"
        )
    options = ProviderOptions(gramine_root=gramine_root, sim_tee=sim_tee, tsm_root=tsm_root)
    return factory(role, options)
