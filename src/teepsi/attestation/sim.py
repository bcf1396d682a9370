"""An honest *simulated* Intel SGX DCAP platform, and a simulated TDX platform.

INSECURE-SIMULATED: this module makes evidence that proves nothing. It mints real
DCAP v3 quotes (SGX) and v4 quotes (TDX, TD report body) and the matching collateral
(TCB info, QE identity, CRLs; for TDX the TDX TCB info with the TDX module and its
identities, and the TD quoting enclave's identity) under a
local PKI shaped like Intel's, whose private keys ship with teepsi in
``data/sim_pki.json`` (generated once by ``scripts/generate_sim_pki.py``). Anyone can
therefore forge simulated quotes for any enclave identity and any TCB status.

What the simulation buys is a shared code path: simulated quotes are verified by
exactly the production verifier (dcap-qvl), only against :data:`SIM_ROOT_CA_DER`
instead of Intel's SGX Root CA. ``dcap_qvl.verify`` (Intel's root) rejects them, so
they can only be accepted by a verifier that was explicitly told to trust the
simulated root (``--allow-simulated``). :func:`is_simulated_quote` lets a verifier
say *why* it refuses such a quote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.attestation.evidence import (
    REPORT_DATA_SIZE,
    EnclaveIdentity,
    EvidenceError,
    EvidenceProvider,
    Role,
    TdIdentity,
    tdx_report_data,
)
from teepsi.attestation.quote import (
    CERT_DATA_TYPE_PCK_CHAIN,
    ReportBody,
    TdReportBody,
    attributes_bytes,
    encode_header,
    encode_signature_data,
    parse_quote,
)
from teepsi.attestation.sim_pki import (
    SIM_ROOT_CA_DER,
    SIM_ROOT_CA_SHA256,
    load_pki,
    make_crl,
    pem,
    raw_public_key,
    raw_signature,
)
from teepsi.attestation.tcb import TcbStatus
from teepsi.timefmt import iso_utc

__all__ = [
    "SIM_ROOT_CA_DER",
    "SIM_ROOT_CA_SHA256",
    "SimEvidenceProvider",
    "SimPlatform",
    "SimPlatformConfig",
    "SimTdxEvidenceProvider",
    "SimTdxPlatform",
    "TcbStatus",
    "is_simulated_quote",
]


@dataclass(frozen=True)
class SimPlatformConfig:
    """How the simulated platform should look to a verifier."""

    #: The status dcap-qvl must report for this platform's quotes.
    tcb_status: TcbStatus = TcbStatus.UP_TO_DATE
    #: Advisories listed on the platform's TCB level (only for non-UpToDate levels).
    advisory_ids: tuple[str, ...] = ()
    #: UNIX seconds of issueDate/thisUpdate; None means "now" when collateral is made.
    collateral_issued_at: int | None = None
    #: Distance from issue to nextUpdate of TCB info, QE identity and both CRLs.
    collateral_validity_seconds: int = 30 * 24 * 3600
    #: List the PCK certificate's serial number in the PCK CRL.
    revoke_pck: bool = False
    #: tcbEvaluationDataNumber of TCB info and QE identity (Intel raises it at each TCB
    #: recovery); a higher one makes genuine, signed "newer" collateral.
    tcb_evaluation_data_number: int = 17

    def __post_init__(self) -> None:
        # Accept plain strings too, but fail early on ones Intel never uses.
        object.__setattr__(self, "tcb_status", TcbStatus(self.tcb_status))
        if self.tcb_status is TcbStatus.UP_TO_DATE and self.advisory_ids:
            raise ValueError("an UpToDate TCB level carries no advisories")
        if self.collateral_validity_seconds <= 0:
            raise ValueError("collateral_validity_seconds must be positive")
        if not 0 <= self.tcb_evaluation_data_number <= 0xFFFFFFFF:
            raise ValueError("tcb_evaluation_data_number must fit in 32 bits")


# --- The simulated platform ---

# Collateral made "now" is dated a little in the past: dcap-qvl refuses documents
# issued in the future, and the verifier's clock may lag the prover's.
_CLOCK_SKEW_ALLOWANCE_SECONDS = 300
# What Intel's Quoting Enclave puts in its authentication data; any 32 bytes would do.
_QE_AUTH_DATA = bytes(range(32))
_QE_MR_ENCLAVE = hashlib.sha256(b"teepsi INSECURE-SIMULATED Quoting Enclave").digest()
_TD_QE_MR_ENCLAVE = hashlib.sha256(b"teepsi INSECURE-SIMULATED TD Quoting Enclave").digest()
_TD_QE_ISV_PROD_ID = 2
_QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"
_PLATFORM_LEVEL_TCB_DATE = "2023-02-15T00:00:00Z"
_LATEST_TCB_DATE = "2024-03-13T00:00:00Z"


def _compact_json(value: object) -> str:
    # The signature covers these exact bytes, so the text is produced exactly once.
    return json.dumps(value, separators=(",", ":"))


class _SimQuotingPlatform:
    """What simulated SGX and TDX platforms share: the committed PCK, one attestation
    key certified by a QE report, and collateral signed by the simulated TCB signer.

    Subclasses say which quote layout they make and which TCB info and QE identity
    describe them.
    """

    #: True for TDX v4 quotes (TD quoting enclave), False for SGX v3.
    _tdx: ClassVar[bool] = False

    def __init__(self, config: SimPlatformConfig = SimPlatformConfig()) -> None:
        self.config = config
        self._pki = load_pki()
        # Like a real QE, the attestation key lives as long as the platform object.
        self._attestation_key = ec.generate_private_key(ec.SECP256R1())
        self._attestation_public_key = raw_public_key(self._attestation_key)
        qe_report_data = hashlib.sha256(self._attestation_public_key + _QE_AUTH_DATA).digest()
        pki = self._pki
        self._qe_report = ReportBody(
            cpu_svn=pki.cpu_svn,
            misc_select=pki.qe_misc_select,
            attributes=attributes_bytes(pki.qe_attribute_flags, pki.qe_xfrm),
            mr_enclave=_TD_QE_MR_ENCLAVE if self._tdx else _QE_MR_ENCLAVE,
            mr_signer=pki.qe_mr_signer,
            isv_prod_id=self._qe_isv_prod_id,
            isv_svn=pki.qe_isv_svn,
            report_data=qe_report_data + bytes(32),
        ).to_bytes()
        # The PCK key certifies the attestation key once, as the QE does at key generation.
        self._qe_report_signature = raw_signature(pki.pck_key, self._qe_report)
        # Header user data: a per-platform QE id (16 bytes) then four zero bytes.
        self._header = encode_header(
            qe_svn=pki.qe_isv_svn,
            pce_svn=pki.pce_svn,
            user_data=secrets.token_bytes(16) + bytes(4),
            tdx=self._tdx,
        )

    @property
    def _qe_isv_prod_id(self) -> int:
        # Intel's TD quoting enclave has ISV_PROD_ID 2; the SGX QE's comes from the PKI.
        return _TD_QE_ISV_PROD_ID if self._tdx else self._pki.qe_isv_prod_id

    def _signed_quote(self, body: bytes) -> bytes:
        """Header + ``body`` + the signature data, as the quoting enclave makes them."""
        signed = self._header + body
        return signed + encode_signature_data(
            isv_signature=raw_signature(self._attestation_key, signed),
            attestation_public_key=self._attestation_public_key,
            qe_report=self._qe_report,
            qe_report_signature=self._qe_report_signature,
            qe_auth_data=_QE_AUTH_DATA,
            pck_chain_pem=self._pki.pck_chain_pem,
            tdx=self._tdx,
        )

    def collateral_json(self) -> str:
        """Collateral for this platform's quotes, in dcap-qvl's JSON form.

        Load it with ``dcap_qvl.QuoteCollateralV3.from_json``.
        """
        cfg = self.config
        pki = self._pki
        issued = (
            cfg.collateral_issued_at
            if cfg.collateral_issued_at is not None
            else int(time.time()) - _CLOCK_SKEW_ALLOWANCE_SECONDS
        )
        expires = issued + cfg.collateral_validity_seconds
        tcb_info = _compact_json(self._tcb_info(issued, expires))
        qe_identity = _compact_json(self._qe_identity(issued, expires))
        this_update = dt.datetime.fromtimestamp(issued, dt.UTC)
        next_update = dt.datetime.fromtimestamp(expires, dt.UTC)
        revoked = (pki.pck.serial_number,) if cfg.revoke_pck else ()
        signing_chain = pem(pki.tcb_signing) + pem(pki.root)
        return json.dumps(
            {
                "pck_crl_issuer_chain": pem(pki.pck_ca) + pem(pki.root),
                "root_ca_crl": make_crl(pki.root, pki.root_key, this_update, next_update).hex(),
                "pck_crl": make_crl(
                    pki.pck_ca, pki.pck_ca_key, this_update, next_update, revoked
                ).hex(),
                "tcb_info_issuer_chain": signing_chain,
                "tcb_info": tcb_info,
                "tcb_info_signature": raw_signature(pki.tcb_signing_key, tcb_info.encode()).hex(),
                "qe_identity_issuer_chain": signing_chain,
                "qe_identity": qe_identity,
                "qe_identity_signature": raw_signature(
                    pki.tcb_signing_key, qe_identity.encode()
                ).hex(),
            }
        )

    def _tcb_info(self, issued: int, expires: int) -> dict[str, object]:
        pki = self._pki
        status = self.config.tcb_status

        def level(
            components: tuple[int, ...], tcb_date: str, tcb_status: TcbStatus, advisories: list[str]
        ) -> dict[str, object]:
            tcb: dict[str, object] = {
                "sgxtcbcomponents": [{"svn": svn} for svn in components],
                "pcesvn": pki.pce_svn,
            }
            if self._tdx:
                tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in self._tee_tcb_svn]
            entry: dict[str, object] = {
                "tcb": tcb,
                "tcbDate": tcb_date,
                "tcbStatus": str(tcb_status),
            }
            if advisories:
                entry["advisoryIDs"] = advisories
            return entry

        if status is TcbStatus.UP_TO_DATE:
            levels = [level(pki.tcb_components, _LATEST_TCB_DATE, status, [])]
        else:
            # Intel lists levels newest first and the verifier takes the first one the
            # platform meets: put an UpToDate level just above this platform (one more
            # SVN on the first component) and the platform's own level below it.
            newer = (pki.tcb_components[0] + 1, *pki.tcb_components[1:])
            levels = [
                level(newer, _LATEST_TCB_DATE, TcbStatus.UP_TO_DATE, []),
                level(
                    pki.tcb_components,
                    _PLATFORM_LEVEL_TCB_DATE,
                    status,
                    list(self.config.advisory_ids),
                ),
            ]
        info: dict[str, object] = {
            "id": "TDX" if self._tdx else "SGX",
            "version": 3,
            "issueDate": iso_utc(issued),
            "nextUpdate": iso_utc(expires),
            "fmspc": pki.fmspc,
            "pceId": pki.pce_id,
            "tcbType": 0,
            "tcbEvaluationDataNumber": self.config.tcb_evaluation_data_number,
        }
        if self._tdx:
            info.update(self._tdx_module_info())
        info["tcbLevels"] = levels
        return info

    @property
    def _tee_tcb_svn(self) -> bytes:
        return bytes(16)

    def _tdx_module_info(self) -> dict[str, object]:
        return {}

    def _qe_identity(self, issued: int, expires: int) -> dict[str, object]:
        pki = self._pki
        return {
            "id": "TD_QE" if self._tdx else "QE",
            "version": 2,
            "issueDate": iso_utc(issued),
            "nextUpdate": iso_utc(expires),
            "tcbEvaluationDataNumber": self.config.tcb_evaluation_data_number,
            "miscselect": pki.qe_misc_select.to_bytes(4, "little").hex().upper(),
            "miscselectMask": "FFFFFFFF",
            "attributes": attributes_bytes(pki.qe_attribute_flags, 0).hex().upper(),
            "attributesMask": _QE_ATTRIBUTES_MASK,
            "mrsigner": pki.qe_mr_signer.hex().upper(),
            "isvprodid": self._qe_isv_prod_id,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": pki.qe_isv_svn},
                    "tcbDate": _LATEST_TCB_DATE,
                    "tcbStatus": str(TcbStatus.UP_TO_DATE),
                }
            ],
        }


class SimPlatform(_SimQuotingPlatform):
    """One simulated SGX machine: a Quoting Enclave with its own attestation key.

    The PCK certificate (hence FMSPC, CPUSVN, PCESVN) is the committed one; the TCB
    status comes from the TCB info that :meth:`collateral_json` signs, which places
    this platform on a level with the configured status.
    """

    def quote(self, identity: EnclaveIdentity, report_data: bytes) -> bytes:
        """A DCAP v3 quote for an enclave with ``identity``, carrying ``report_data``."""
        _check_report_data(report_data)
        body = ReportBody(
            cpu_svn=self._pki.cpu_svn,
            attributes=attributes_bytes(identity.attribute_flags, identity.xfrm),
            mr_enclave=identity.mr_enclave,
            mr_signer=identity.mr_signer,
            isv_prod_id=identity.isv_prod_id,
            isv_svn=identity.isv_svn,
            report_data=bytes(report_data),
        )
        return self._signed_quote(body.to_bytes())


#: The simulated TDX module: its measurement (MRSEAM) and TEE_TCB_SVN (byte 0 the
#: module's SVN, byte 1 its major version, as Intel's TDX module reports them).
SIM_MR_SEAM = hashlib.sha384(b"teepsi INSECURE-SIMULATED TDX module").digest()
SIM_TEE_TCB_SVN = bytes([3, 1, 2]) + bytes(13)
# Intel signs the TDX module with an all-zero MRSIGNER_SEAM; dcap-qvl checks it.
_TDX_MODULE_MR_SIGNER = bytes(48)
_TDX_MODULE_ATTRIBUTES = bytes(8)


class SimTdxPlatform(_SimQuotingPlatform):
    """One simulated TDX machine: a TDX module and a TD quoting enclave.

    Quotes are real v4 TDX quotes (TD report body); the collateral is TDX TCB info
    (TDX module and its identities, TDX TCB components) and the TD_QE identity, signed
    under the same simulated PKI as :class:`SimPlatform`'s.
    """

    _tdx: ClassVar[bool] = True

    def __init__(
        self,
        config: SimPlatformConfig = SimPlatformConfig(),
        *,
        mr_seam: bytes = SIM_MR_SEAM,
        tee_tcb_svn: bytes = SIM_TEE_TCB_SVN,
    ) -> None:
        if len(mr_seam) != 48 or len(tee_tcb_svn) != 16:
            raise ValueError("mr_seam must be 48 bytes and tee_tcb_svn 16")
        if tee_tcb_svn[1] == 0:
            raise ValueError("tee_tcb_svn[1] (the TDX module's major version) must be above 0")
        super().__init__(config)
        self.mr_seam = mr_seam
        self._module_tcb_svn = tee_tcb_svn

    @property
    def _tee_tcb_svn(self) -> bytes:
        return self._module_tcb_svn

    def _tdx_module_info(self) -> dict[str, object]:
        signer = _TDX_MODULE_MR_SIGNER.hex().upper()
        attributes = _TDX_MODULE_ATTRIBUTES.hex().upper()
        return {
            "tdxModule": {
                "mrsigner": signer,
                "attributes": attributes,
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [
                {
                    "id": f"TDX_{self._module_tcb_svn[1]:02X}",
                    "mrsigner": signer,
                    "attributes": attributes,
                    "attributesMask": "FFFFFFFFFFFFFFFF",
                    "tcbLevels": [
                        {
                            "tcb": {"isvsvn": self._module_tcb_svn[0]},
                            "tcbDate": _LATEST_TCB_DATE,
                            "tcbStatus": str(TcbStatus.UP_TO_DATE),
                        }
                    ],
                }
            ],
        }

    def quote(self, identity: TdIdentity, report_data: bytes) -> bytes:
        """A TDX v4 quote for a TD with ``identity``, carrying ``report_data``.

        MRSEAM and TEE_TCB_SVN are this platform's (the TDX module's), whatever
        ``identity`` says.
        """
        _check_report_data(report_data)
        body = TdReportBody(
            tee_tcb_svn=self._module_tcb_svn,
            mr_seam=self.mr_seam,
            mr_signer_seam=_TDX_MODULE_MR_SIGNER,
            seam_attributes=_TDX_MODULE_ATTRIBUTES,
            td_attributes=identity.td_attributes.to_bytes(8, "little"),
            xfam=identity.xfam.to_bytes(8, "little"),
            mr_td=identity.mr_td,
            mr_config_id=identity.mr_config_id,
            mr_owner=identity.mr_owner,
            mr_owner_config=identity.mr_owner_config,
            rt_mr0=identity.rt_mr0,
            rt_mr1=identity.rt_mr1,
            rt_mr2=identity.rt_mr2,
            rt_mr3=identity.rt_mr3,
            report_data=bytes(report_data),
        )
        return self._signed_quote(body.to_bytes())


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise EvidenceError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")


class SimEvidenceProvider(EvidenceProvider):
    """Evidence from a :class:`SimPlatform` for one fixed enclave identity."""

    name: ClassVar[str] = "sim"
    simulated: ClassVar[bool] = True

    def __init__(self, identity: EnclaveIdentity, platform: SimPlatform | None = None) -> None:
        self.identity = identity
        self.platform = platform if platform is not None else SimPlatform()

    def quote(self, report_data: bytes) -> bytes:
        return self.platform.quote(self.identity, report_data)

    def collateral_json(self, quote: bytes) -> str | None:
        # The collateral covers any quote of the simulated PKI; anything else is not ours.
        if not is_simulated_quote(quote):
            return None
        return self.platform.collateral_json()


class SimTdxEvidenceProvider(EvidenceProvider):
    """Evidence from a :class:`SimTdxPlatform` for one TD acting as ``role``.

    Like every TDX provider, it binds the role into report_data
    (:func:`teepsi.attestation.evidence.tdx_report_data`): one VM image serves both
    roles, so the measurements alone cannot tell them apart.
    """

    name: ClassVar[str] = "sim"
    simulated: ClassVar[bool] = True

    def __init__(
        self, identity: TdIdentity, role: Role, platform: SimTdxPlatform | None = None
    ) -> None:
        self.identity = identity
        self.role = role
        self.platform = platform if platform is not None else SimTdxPlatform()

    def quote(self, report_data: bytes) -> bytes:
        return self.platform.quote(self.identity, tdx_report_data(self.role, report_data))

    def collateral_json(self, quote: bytes) -> str | None:
        if not is_simulated_quote(quote):
            return None
        return self.platform.collateral_json()


def is_simulated_quote(quote: bytes) -> bool:
    """True when ``quote``'s embedded PCK chain ends in the simulated root CA.

    Never raises: anything that is not a well-formed SGX v3 or TDX v4 quote with a PEM
    chain is simply not a simulated quote.
    """
    try:
        parsed = parse_quote(quote)
        if parsed.cert_data_type != CERT_DATA_TYPE_PCK_CHAIN:
            return False
        chain = x509.load_pem_x509_certificates(parsed.cert_data.rstrip(b"\0"))
        root_der = chain[-1].public_bytes(serialization.Encoding.DER)
    except Exception:
        return False
    return hashlib.sha256(root_der).hexdigest() == SIM_ROOT_CA_SHA256
