"""The one interface every source of attestation evidence implements.

An evidence provider turns 64 bytes of report_data into a DCAP quote over the
enclave it runs in. Providers differ only in where the quote comes from (Gramine's
pseudo-files on real SGX, or the local simulated platform); everything downstream,
RA-TLS certificates and verification, is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

REPORT_DATA_SIZE = 64


class Role(IntEnum):
    """The enclave roles of teepsi; the value is the role's ISV_PROD_ID."""

    SERVER = 1
    DATA_PROVIDER = 2


class AttributeFlag(IntEnum):
    """SGX SECS attribute flags (low 64 bits of the report's attributes field)."""

    INIT = 0x01
    DEBUG = 0x02
    MODE64BIT = 0x04
    PROVISION_KEY = 0x10
    EINITTOKEN_KEY = 0x20


DEFAULT_ATTRIBUTE_FLAGS = AttributeFlag.INIT | AttributeFlag.MODE64BIT
DEFAULT_XFRM = 0xE7  # x87, SSE, AVX, AVX-512 state, as typical production enclaves report


@dataclass(frozen=True)
class EnclaveIdentity:
    """What an SGX report says about the enclave that produced it."""

    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    attribute_flags: int = int(DEFAULT_ATTRIBUTE_FLAGS)
    xfrm: int = DEFAULT_XFRM

    def __post_init__(self) -> None:
        if len(self.mr_enclave) != 32 or len(self.mr_signer) != 32:
            raise ValueError("MRENCLAVE and MRSIGNER must be 32 bytes each")
        if not (0 <= self.isv_prod_id <= 0xFFFF and 0 <= self.isv_svn <= 0xFFFF):
            raise ValueError("ISV_PROD_ID and ISV_SVN must fit in 16 bits")


class EvidenceError(Exception):
    """Evidence could not be produced (no enclave, device missing, bad input)."""


class EvidenceProvider(ABC):
    """Produces DCAP quotes whose report_data is chosen by the caller."""

    #: Name used on the command line (``--attestation NAME``).
    name: ClassVar[str]
    #: True when the quotes are not backed by hardware.
    simulated: ClassVar[bool]

    @abstractmethod
    def quote(self, report_data: bytes) -> bytes:
        """Return a DCAP quote whose report_data is exactly ``report_data`` (64 bytes)."""

    def collateral_json(self, quote: bytes) -> str | None:
        """Collateral for ``quote`` in dcap-qvl's JSON form, when the provider has it.

        Real platforms return None: collateral for them is fetched from a PCCS by
        :mod:`teepsi.attestation.collateral`, never by the provider.
        """
        return None
