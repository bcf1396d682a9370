"""The simulated SGX DCAP platform, judged by the production verifier (dcap-qvl).

Simulated quotes must pass ``dcap_qvl.verify_with_root_ca`` against the simulated
root with exactly the configured outcome, and must fail ``dcap_qvl.verify`` (Intel's
root), so that simulation mode shares the production verification code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import dcap_qvl
import pytest

from teepsi.attestation.evidence import (
    AttributeFlag,
    EnclaveIdentity,
    EvidenceError,
    EvidenceProvider,
)
from teepsi.attestation.quote import (
    HEADER_SIZE,
    INTEL_QE_VENDOR_ID,
    REPORT_BODY_SIZE,
    ReportBody,
    parse_quote,
)
from teepsi.attestation.sim import (
    SIM_ROOT_CA_DER,
    SimEvidenceProvider,
    SimPlatform,
    SimPlatformConfig,
    TcbStatus,
    is_simulated_quote,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sgx-dcap"
REAL_QUOTE = VECTORS / "sgx_quote"
REAL_COLLATERAL = VECTORS / "sgx_quote_collateral.json"
REAL_VERIFY_AT = 1750330631

IDENTITY = EnclaveIdentity(
    mr_enclave=bytes(range(32)),
    mr_signer=bytes(range(100, 132)),
    isv_prod_id=2,
    isv_svn=7,
)
REPORT_DATA = hashlib.sha512(b"teepsi test report data").digest()


def _now() -> int:
    return int(time.time())


def _collateral(platform: SimPlatform) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3.from_json(platform.collateral_json())


def _verify(quote: bytes, platform: SimPlatform, now: int | None = None) -> dcap_qvl.VerifiedReport:
    return dcap_qvl.verify_with_root_ca(
        quote, _collateral(platform), SIM_ROOT_CA_DER, _now() if now is None else now
    )


@pytest.fixture(scope="module")
def platform() -> SimPlatform:
    return SimPlatform()


@pytest.fixture(scope="module")
def sim_quote(platform: SimPlatform) -> bytes:
    return platform.quote(IDENTITY, REPORT_DATA)


# --- Accepted under the simulated root, with the configured status ---


def test_default_platform_is_up_to_date(platform: SimPlatform, sim_quote: bytes) -> None:
    report = _verify(sim_quote, platform)
    assert report.status == "UpToDate"
    assert report.advisory_ids == []


@pytest.mark.parametrize("status", [s for s in TcbStatus if s is not TcbStatus.REVOKED])
def test_each_tcb_status_is_reported_as_configured(status: TcbStatus) -> None:
    advisories = () if status is TcbStatus.UP_TO_DATE else ("SIM-SA-00001", "SIM-SA-00002")
    platform = SimPlatform(SimPlatformConfig(tcb_status=status, advisory_ids=advisories))
    report = _verify(platform.quote(IDENTITY, REPORT_DATA), platform)
    assert report.status == status.value
    assert report.advisory_ids == list(advisories)
    verified = json.loads(report.to_json())
    assert verified["platform_status"]["status"] == status.value
    assert verified["qe_status"]["status"] == "UpToDate"


def test_revoked_tcb_level_is_rejected_by_dcap_qvl() -> None:
    # dcap-qvl 0.7.0 does not return "Revoked": verify raises instead.
    platform = SimPlatform(SimPlatformConfig(tcb_status=TcbStatus.REVOKED))
    with pytest.raises(ValueError, match="TCB status is invalid: Revoked"):
        _verify(platform.quote(IDENTITY, REPORT_DATA), platform)


def test_tcb_status_accepts_its_string_value() -> None:
    config = SimPlatformConfig(tcb_status="OutOfDate")  # type: ignore[arg-type]
    assert config.tcb_status is TcbStatus.OUT_OF_DATE


def test_up_to_date_with_advisories_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="advisories"):
        SimPlatformConfig(advisory_ids=("SIM-SA-00001",))


# --- What the verifier reads back ---


def test_report_fields_round_trip(platform: SimPlatform, sim_quote: bytes) -> None:
    parsed = dcap_qvl.parse_quote(sim_quote)
    assert parsed.is_sgx()
    assert parsed.report.report_data == REPORT_DATA
    assert parsed.report.mr_enclave == IDENTITY.mr_enclave
    assert parsed.report.mr_signer == IDENTITY.mr_signer
    assert parsed.report.attributes == struct.pack("<QQ", IDENTITY.attribute_flags, IDENTITY.xfrm)

    enclave = json.loads(_verify(sim_quote, platform).to_json())["report"]["SgxEnclave"]
    assert bytes.fromhex(enclave["report_data"]) == REPORT_DATA
    assert bytes.fromhex(enclave["mr_enclave"]) == IDENTITY.mr_enclave
    assert bytes.fromhex(enclave["mr_signer"]) == IDENTITY.mr_signer
    assert enclave["isv_prod_id"] == IDENTITY.isv_prod_id
    assert enclave["isv_svn"] == IDENTITY.isv_svn
    assert int.from_bytes(bytes.fromhex(enclave["attributes"])[:8], "little") == (
        AttributeFlag.INIT | AttributeFlag.MODE64BIT
    )


def test_quote_v3_layout(platform: SimPlatform, sim_quote: bytes) -> None:
    header = dcap_qvl.parse_quote(sim_quote).header
    assert (header.version, header.attestation_key_type, header.tee_type) == (3, 2, 0)
    assert header.qe_vendor_id == INTEL_QE_VENDOR_ID

    parsed = parse_quote(sim_quote)
    body = parsed.report_body
    assert (body.isv_prod_id, body.isv_svn) == (IDENTITY.isv_prod_id, IDENTITY.isv_svn)
    assert sim_quote[HEADER_SIZE + 64 : HEADER_SIZE + 96] == IDENTITY.mr_enclave
    assert sim_quote[368:432] == REPORT_DATA
    (sig_len,) = struct.unpack_from("<I", sim_quote, HEADER_SIZE + REPORT_BODY_SIZE)
    assert len(sim_quote) == HEADER_SIZE + REPORT_BODY_SIZE + 4 + sig_len
    assert parsed.cert_data_type == 5
    assert parsed.cert_data.count(b"-----BEGIN CERTIFICATE-----") == 3
    qe_report = ReportBody.from_bytes(parsed.qe_report)
    expected = hashlib.sha256(parsed.attestation_public_key + parsed.qe_auth_data).digest()
    assert qe_report.report_data[:32] == expected

    pck = dcap_qvl.parse_quote(sim_quote).pck_extension()
    assert pck is not None
    assert dcap_qvl.parse_quote(sim_quote).fmspc() == pck.fmspc.hex().upper()
    assert len(pck.ppid) == 16 and len(pck.pce_id) == 2 and len(pck.cpu_svn) == 16


def test_quote_parser_reads_the_real_intel_vector() -> None:
    raw = REAL_QUOTE.read_bytes()
    parsed = parse_quote(raw)
    body = parsed.report_body
    assert body.mr_enclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert body.mr_signer.hex() == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert (body.isv_prod_id, body.isv_svn) == (0, 0)
    assert body.report_data.rstrip(b"\0") == b"Hello, world!"
    assert body.to_bytes() == raw[HEADER_SIZE : HEADER_SIZE + REPORT_BODY_SIZE]
    assert parsed.cert_data_type == 5


# --- Rejections ---


def test_revoked_pck_certificate_is_rejected() -> None:
    platform = SimPlatform(SimPlatformConfig(revoke_pck=True))
    with pytest.raises(ValueError, match=r"(?i)revoked"):
        _verify(platform.quote(IDENTITY, REPORT_DATA), platform)


def test_expired_collateral_is_rejected() -> None:
    issued = _now() - 60 * 24 * 3600
    platform = SimPlatform(
        SimPlatformConfig(collateral_issued_at=issued, collateral_validity_seconds=30 * 24 * 3600)
    )
    quote = platform.quote(IDENTITY, REPORT_DATA)
    with pytest.raises(ValueError, match=r"(?i)expired"):
        _verify(quote, platform)
    # The same collateral was fine while it was fresh.
    assert _verify(quote, platform, now=issued + 3600).status == "UpToDate"


def test_collateral_from_the_future_is_rejected() -> None:
    platform = SimPlatform(SimPlatformConfig(collateral_issued_at=_now() + 3600))
    with pytest.raises(ValueError, match=r"(?i)future"):
        _verify(platform.quote(IDENTITY, REPORT_DATA), platform)


@pytest.mark.parametrize(
    "offset",
    [
        HEADER_SIZE,  # cpu_svn
        HEADER_SIZE + 48,  # attributes (the debug bit lives here)
        HEADER_SIZE + 64,  # mr_enclave
        HEADER_SIZE + 128,  # mr_signer
        HEADER_SIZE + 256,  # isv_prod_id
        HEADER_SIZE + 258,  # isv_svn
        HEADER_SIZE + REPORT_BODY_SIZE - 1,  # last byte of report_data
    ],
)
def test_flipped_report_body_byte_is_rejected(
    platform: SimPlatform, sim_quote: bytes, offset: int
) -> None:
    tampered = bytearray(sim_quote)
    tampered[offset] ^= 0x01
    with pytest.raises(ValueError, match="signature is invalid"):
        _verify(bytes(tampered), platform)


def test_flipped_qe_report_byte_is_rejected(platform: SimPlatform, sim_quote: bytes) -> None:
    tampered = bytearray(sim_quote)
    tampered[HEADER_SIZE + REPORT_BODY_SIZE + 4 + 128 + 100] ^= 0x01
    with pytest.raises(ValueError):
        _verify(bytes(tampered), platform)


def test_intel_root_rejects_simulated_quotes(platform: SimPlatform, sim_quote: bytes) -> None:
    with pytest.raises(ValueError):
        dcap_qvl.verify(sim_quote, _collateral(platform), _now())
    # Nor does genuine Intel collateral make a simulated quote pass.
    real = dcap_qvl.QuoteCollateralV3.from_json(REAL_COLLATERAL.read_text())
    with pytest.raises(ValueError):
        dcap_qvl.verify(sim_quote, real, REAL_VERIFY_AT)


def test_simulated_root_does_not_accept_intel_quotes() -> None:
    real = dcap_qvl.QuoteCollateralV3.from_json(REAL_COLLATERAL.read_text())
    raw = REAL_QUOTE.read_bytes()
    assert dcap_qvl.verify(raw, real, REAL_VERIFY_AT).status  # the vector itself is good
    with pytest.raises(ValueError):
        dcap_qvl.verify_with_root_ca(raw, real, SIM_ROOT_CA_DER, REAL_VERIFY_AT)


def test_debug_enclave_is_refused_by_dcap_qvl(platform: SimPlatform) -> None:
    debug = EnclaveIdentity(
        mr_enclave=IDENTITY.mr_enclave,
        mr_signer=IDENTITY.mr_signer,
        isv_prod_id=IDENTITY.isv_prod_id,
        isv_svn=IDENTITY.isv_svn,
        attribute_flags=IDENTITY.attribute_flags | AttributeFlag.DEBUG,
    )
    quote = platform.quote(debug, REPORT_DATA)
    assert dcap_qvl.parse_quote(quote).report.attributes[0] & AttributeFlag.DEBUG
    with pytest.raises(ValueError, match="Debug mode is enabled"):
        _verify(quote, platform)


# --- Detection of simulated evidence ---


def test_is_simulated_quote(sim_quote: bytes) -> None:
    assert is_simulated_quote(sim_quote)
    assert not is_simulated_quote(REAL_QUOTE.read_bytes())


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"garbage",
        bytes(48),
        os.urandom(5000),
        b"\x03\x00\x02\x00" + bytes(2000),
    ],
)
def test_is_simulated_quote_is_false_on_garbage(garbage: bytes) -> None:
    assert not is_simulated_quote(garbage)


def test_is_simulated_quote_is_false_on_truncated_quote(sim_quote: bytes) -> None:
    for cut in (10, HEADER_SIZE + REPORT_BODY_SIZE, len(sim_quote) // 2, len(sim_quote) - 200):
        assert not is_simulated_quote(sim_quote[:cut])


# --- Collateral form, provider, cross-process use ---


def test_collateral_json_is_dcap_qvl_shape() -> None:
    issued = 1_800_000_000
    platform = SimPlatform(SimPlatformConfig(collateral_issued_at=issued))
    text = platform.collateral_json()
    ours = json.loads(text)
    theirs = json.loads(dcap_qvl.QuoteCollateralV3.from_json(text).to_json())
    assert ours == theirs
    tcb_info = json.loads(ours["tcb_info"])
    assert (tcb_info["id"], tcb_info["version"]) == ("SGX", 3)
    assert tcb_info["issueDate"] == "2027-01-15T08:00:00Z"
    assert tcb_info["nextUpdate"] == "2027-02-14T08:00:00Z"
    qe_identity = json.loads(ours["qe_identity"])
    assert (qe_identity["id"], qe_identity["version"]) == ("QE", 2)
    assert qe_identity["nextUpdate"] == tcb_info["nextUpdate"]


def test_evidence_provider(sim_quote: bytes) -> None:
    provider = SimEvidenceProvider(IDENTITY)
    assert isinstance(provider, EvidenceProvider)
    assert provider.name == "sim" and provider.simulated
    quote = provider.quote(REPORT_DATA)
    collateral = provider.collateral_json(quote)
    assert collateral is not None
    report = dcap_qvl.verify_with_root_ca(
        quote, dcap_qvl.QuoteCollateralV3.from_json(collateral), SIM_ROOT_CA_DER, _now()
    )
    assert report.status == "UpToDate"
    assert provider.collateral_json(REAL_QUOTE.read_bytes()) is None
    with pytest.raises(EvidenceError):
        provider.quote(b"short")


def test_collateral_of_another_platform_instance_verifies(sim_quote: bytes) -> None:
    # Collateral depends on the configuration only, never on the attestation key.
    assert _verify(sim_quote, SimPlatform()).status == "UpToDate"


def test_quotes_are_fast(platform: SimPlatform) -> None:
    start = time.perf_counter()
    for _ in range(100):
        platform.quote(IDENTITY, REPORT_DATA)
    assert time.perf_counter() - start < 2.0
