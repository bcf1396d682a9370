"""The one interface every source of attestation evidence implements.

An evidence provider turns 64 bytes of report_data into a DCAP quote over the
enclave it runs in. Providers differ only in where the quote comes from (Gramine's
pseudo-files on real SGX, or the local simulated platform); everything downstream,
RA-TLS certificates and verification, is shared.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from teepsi.errors import TeepsiError

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


class TdAttributeFlag(IntEnum):
    """TDX TD attribute bits (TDATTRIBUTES, little-endian u64) that teepsi judges."""

    DEBUG = 1 << 0
    SEPT_VE_DISABLE = 1 << 28


#: TD attributes of a production TD: not DEBUG, EPT-violation #VE disabled.
DEFAULT_TD_ATTRIBUTES = int(TdAttributeFlag.SEPT_VE_DISABLE)
#: XFAM of a typical TD (x87, SSE, AVX, AVX-512, PKRU and AMX state), as Intel's vectors show.
DEFAULT_XFAM = 0x602E7
_TD_MR_SIZE = 48


@dataclass(frozen=True)
class TdIdentity:
    """What a TDX TD report says about the virtual machine that produced it.

    Measurements are SHA-384 (48 bytes). A TD has no ISV_PROD_ID: its role is bound
    into report_data instead (:func:`tdx_report_data`).
    """

    mr_td: bytes
    rt_mr0: bytes = bytes(_TD_MR_SIZE)
    rt_mr1: bytes = bytes(_TD_MR_SIZE)
    rt_mr2: bytes = bytes(_TD_MR_SIZE)
    rt_mr3: bytes = bytes(_TD_MR_SIZE)
    mr_config_id: bytes = bytes(_TD_MR_SIZE)
    mr_owner: bytes = bytes(_TD_MR_SIZE)
    mr_owner_config: bytes = bytes(_TD_MR_SIZE)
    mr_seam: bytes = bytes(_TD_MR_SIZE)
    td_attributes: int = DEFAULT_TD_ATTRIBUTES
    xfam: int = DEFAULT_XFAM
    tee_tcb_svn: bytes = bytes(16)

    def __post_init__(self) -> None:
        for name in TD_MEASUREMENTS:
            if len(getattr(self, name)) != _TD_MR_SIZE:
                raise ValueError(f"{name} must be {_TD_MR_SIZE} bytes")
        if len(self.tee_tcb_svn) != 16:
            raise ValueError("tee_tcb_svn must be 16 bytes")
        if not (0 <= self.td_attributes < 2**64 and 0 <= self.xfam < 2**64):
            raise ValueError("td_attributes and xfam must fit in 64 bits")


#: The 48-byte measurement registers of a TD, in the order reports list them.
TD_MEASUREMENTS = (
    "mr_td",
    "rt_mr0",
    "rt_mr1",
    "rt_mr2",
    "rt_mr3",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "mr_seam",
)

_TDX_ROLE_LABEL = b"teepsi-tdx-role-v1\0"
_KEY_BINDING_SIZE = 32


def tdx_report_data(role: Role, requested: bytes) -> bytes:
    """The report_data a TDX VM acting as ``role`` puts in its quote for ``requested``.

    A whole VM is measured, so a server VM and a data-provider VM built from one image
    measure the same; unlike an SGX enclave it has no ISV_PROD_ID to tell roles apart.
    teepsi binds the role here instead: the first 32 bytes stay ``requested[:32]`` (the
    RA-TLS key binding, so the certificate format is unchanged), the last 32 are
    SHA-256(label || role || requested), which binds the role and all 64 requested
    bytes (a join transcript is 64 bytes).
    """
    if len(requested) != REPORT_DATA_SIZE:
        raise EvidenceError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(requested)}")
    role_binding = hashlib.sha256(_TDX_ROLE_LABEL + role.name.encode() + b"\0" + requested).digest()
    return requested[:_KEY_BINDING_SIZE] + role_binding


class EvidenceError(TeepsiError):
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
