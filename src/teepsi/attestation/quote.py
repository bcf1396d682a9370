"""Byte layout of Intel DCAP quotes: SGX version 3 and TDX version 4 (ECDSA-P256 key).

A v3 quote is a 48-byte header, the 384-byte report body of the attested enclave, a
little-endian u32 length and the signature data. The signature data holds the
attestation key's signature over header + body, the attestation public key, the
Quoting Enclave's own report signed by the PCK key, the QE authentication data and
the certification data (type 5: the PEM chain PCK leaf, intermediate CA, root CA).

A TDX v4 quote has the same 48-byte header (version 4, TEE type 0x81), the 584-byte TD
report body (TD 1.0 ``TDREPORT`` fields), then the signature data: the attestation
key's signature and public key, then certification data of type 6 wrapping the QE
report, its PCK signature, the QE authentication data and the type-5 PEM chain.

Only the layout lives here; no cryptography and no trust decisions. Verification of
quotes is left to dcap-qvl.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from teepsi.errors import TeepsiError

QUOTE_VERSION_3 = 3
QUOTE_VERSION_4 = 4
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0
TEE_TYPE_TDX = 0x81
#: Intel's QE vendor id, which every Intel-provided Quoting Enclave writes in the header.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_TYPE_PCK_CHAIN = 5
#: TDX v4 certification data: QE report, its signature, auth data, then type-5 data.
CERT_DATA_TYPE_QE_REPORT = 6

HEADER_SIZE = 48
REPORT_BODY_SIZE = 384
TD_REPORT_BODY_SIZE = 584
TD_MR_SIZE = 48
ECDSA_SIG_SIZE = 64
ECDSA_PUBKEY_SIZE = 64
USER_DATA_SIZE = 20

#: The first two bytes (u16 version, little-endian) of DCAP quotes v3, v4 and v5.
QUOTE_VERSION_PREFIXES = (b"\x03\x00", b"\x04\x00", b"\x05\x00")
#: Quote v5 puts a body descriptor (u16 type, u32 size) between header and body.
V5_BODY_DESCRIPTOR_SIZE = 6
_SIGNATURE_LENGTH_SIZE = 4
#: (version, TEE type) -> (report_data offset, smallest well-formed size, name): a header,
#: the report body whose last 64 bytes are report_data, a u32 signature length.
_REPORT_DATA_LAYOUTS = {
    (QUOTE_VERSION_3, TEE_TYPE_SGX): (
        HEADER_SIZE + 320,
        HEADER_SIZE + REPORT_BODY_SIZE + _SIGNATURE_LENGTH_SIZE,
        "SGX DCAP v3",
    ),
    (QUOTE_VERSION_4, TEE_TYPE_TDX): (
        HEADER_SIZE + 520,
        HEADER_SIZE + TD_REPORT_BODY_SIZE + _SIGNATURE_LENGTH_SIZE,
        "TDX DCAP v4",
    ),
}
_MIN_QUOTE_SIZE = HEADER_SIZE + REPORT_BODY_SIZE + _SIGNATURE_LENGTH_SIZE
_REPORT_DATA_SIZE = 64

# Offsets inside the 384-byte report body.
_CPU_SVN = slice(0, 16)
_MISC_SELECT = slice(16, 20)
_ISV_EXT_PROD_ID = slice(32, 48)
_ATTRIBUTES = slice(48, 64)
_MR_ENCLAVE = slice(64, 96)
_MR_SIGNER = slice(128, 160)
_CONFIG_ID = slice(192, 256)
_ISV_PROD_ID = slice(256, 258)
_ISV_SVN = slice(258, 260)
_CONFIG_SVN = slice(260, 262)
_ISV_FAMILY_ID = slice(304, 320)
_REPORT_DATA = slice(320, 384)


class QuoteFormatError(TeepsiError, ValueError):
    """The bytes are not a well-formed SGX v3 or TDX v4 DCAP quote."""


def _fixed(name: str, value: bytes, size: int) -> bytes:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class ReportBody:
    """An SGX enclave report body (``sgx_report_body_t``), 384 bytes on the wire."""

    mr_enclave: bytes
    mr_signer: bytes
    report_data: bytes
    isv_prod_id: int = 0
    isv_svn: int = 0
    attributes: bytes = bytes(16)
    cpu_svn: bytes = bytes(16)
    misc_select: int = 0
    config_svn: int = 0
    isv_ext_prod_id: bytes = bytes(16)
    config_id: bytes = bytes(64)
    isv_family_id: bytes = bytes(16)

    def to_bytes(self) -> bytes:
        out = bytearray(REPORT_BODY_SIZE)
        out[_CPU_SVN] = _fixed("cpu_svn", self.cpu_svn, 16)
        out[_MISC_SELECT] = struct.pack("<I", self.misc_select)
        out[_ISV_EXT_PROD_ID] = _fixed("isv_ext_prod_id", self.isv_ext_prod_id, 16)
        out[_ATTRIBUTES] = _fixed("attributes", self.attributes, 16)
        out[_MR_ENCLAVE] = _fixed("mr_enclave", self.mr_enclave, 32)
        out[_MR_SIGNER] = _fixed("mr_signer", self.mr_signer, 32)
        out[_CONFIG_ID] = _fixed("config_id", self.config_id, 64)
        out[_ISV_PROD_ID] = struct.pack("<H", self.isv_prod_id)
        out[_ISV_SVN] = struct.pack("<H", self.isv_svn)
        out[_CONFIG_SVN] = struct.pack("<H", self.config_svn)
        out[_ISV_FAMILY_ID] = _fixed("isv_family_id", self.isv_family_id, 16)
        out[_REPORT_DATA] = _fixed("report_data", self.report_data, 64)
        return bytes(out)

    @property
    def tee(self) -> str:
        return "SGX"

    def canonical_line(self) -> str:
        """The enclave in one canonical line (for logs: measurements only, nothing withheld)."""
        return (
            f"MRENCLAVE {self.mr_enclave.hex()} MRSIGNER {self.mr_signer.hex()} "
            f"ISV_PROD_ID {self.isv_prod_id} ISV_SVN {self.isv_svn}"
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ReportBody:
        if len(data) != REPORT_BODY_SIZE:
            raise QuoteFormatError(f"report body must be {REPORT_BODY_SIZE} bytes")
        return cls(
            mr_enclave=data[_MR_ENCLAVE],
            mr_signer=data[_MR_SIGNER],
            report_data=data[_REPORT_DATA],
            isv_prod_id=struct.unpack("<H", data[_ISV_PROD_ID])[0],
            isv_svn=struct.unpack("<H", data[_ISV_SVN])[0],
            attributes=data[_ATTRIBUTES],
            cpu_svn=data[_CPU_SVN],
            misc_select=struct.unpack("<I", data[_MISC_SELECT])[0],
            config_svn=struct.unpack("<H", data[_CONFIG_SVN])[0],
            isv_ext_prod_id=data[_ISV_EXT_PROD_ID],
            config_id=data[_CONFIG_ID],
            isv_family_id=data[_ISV_FAMILY_ID],
        )


#: The TD report body fields in wire order: (name, size). All byte strings.
TD_REPORT_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", TD_MR_SIZE),
    ("mr_signer_seam", TD_MR_SIZE),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", TD_MR_SIZE),
    ("mr_config_id", TD_MR_SIZE),
    ("mr_owner", TD_MR_SIZE),
    ("mr_owner_config", TD_MR_SIZE),
    ("rt_mr0", TD_MR_SIZE),
    ("rt_mr1", TD_MR_SIZE),
    ("rt_mr2", TD_MR_SIZE),
    ("rt_mr3", TD_MR_SIZE),
    ("report_data", 64),
)


@dataclass(frozen=True)
class TdReportBody:
    """A TDX 1.0 TD report body, 584 bytes on the wire (field names as dcap-qvl's)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rt_mr0: bytes
    rt_mr1: bytes
    rt_mr2: bytes
    rt_mr3: bytes
    report_data: bytes

    @property
    def tee(self) -> str:
        return "TDX"

    def canonical_line(self) -> str:
        """The TD in one canonical line (for logs: measurements only, nothing withheld)."""
        return (
            f"TDX MRTD {self.mr_td.hex()} MRSEAM {self.mr_seam.hex()} "
            f"TEE_TCB_SVN {self.tee_tcb_svn.hex()}"
        )

    def to_bytes(self) -> bytes:
        return b"".join(_fixed(name, getattr(self, name), size) for name, size in TD_REPORT_FIELDS)

    @classmethod
    def from_bytes(cls, data: bytes) -> TdReportBody:
        if len(data) != TD_REPORT_BODY_SIZE:
            raise QuoteFormatError(f"TD report body must be {TD_REPORT_BODY_SIZE} bytes")
        values: dict[str, bytes] = {}
        pos = 0
        for name, size in TD_REPORT_FIELDS:
            values[name] = data[pos : pos + size]
            pos += size
        return cls(**values)


def attributes_bytes(flags: int, xfrm: int) -> bytes:
    """The 16-byte ATTRIBUTES field: flags then XFRM, each a little-endian u64."""
    return struct.pack("<QQ", flags, xfrm)


def encode_header(qe_svn: int, pce_svn: int, user_data: bytes, *, tdx: bool = False) -> bytes:
    """The 48-byte header of an SGX v3 (or, with ``tdx``, a TDX v4) ECDSA-P256 quote."""
    return (
        struct.pack(
            "<HHIHH",
            QUOTE_VERSION_4 if tdx else QUOTE_VERSION_3,
            ATT_KEY_TYPE_ECDSA_P256,
            TEE_TYPE_TDX if tdx else TEE_TYPE_SGX,
            qe_svn,
            pce_svn,
        )
        + INTEL_QE_VENDOR_ID
        + _fixed("user_data", user_data, USER_DATA_SIZE)
    )


def encode_signature_data(
    isv_signature: bytes,
    attestation_public_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_chain_pem: bytes,
    *,
    tdx: bool = False,
) -> bytes:
    """The signature data section, preceded by its u32 length.

    SGX v3 carries the QE report section directly; TDX v4 wraps it in certification
    data of type 6 after the attestation key.
    """
    qe_section = b"".join(
        (
            _fixed("qe_report", qe_report, REPORT_BODY_SIZE),
            _fixed("qe_report_signature", qe_report_signature, ECDSA_SIG_SIZE),
            struct.pack("<H", len(qe_auth_data)),
            qe_auth_data,
            struct.pack("<HI", CERT_DATA_TYPE_PCK_CHAIN, len(pck_chain_pem)),
            pck_chain_pem,
        )
    )
    if tdx:
        qe_section = struct.pack("<HI", CERT_DATA_TYPE_QE_REPORT, len(qe_section)) + qe_section
    body = (
        _fixed("isv_signature", isv_signature, ECDSA_SIG_SIZE)
        + _fixed("attestation_public_key", attestation_public_key, ECDSA_PUBKEY_SIZE)
        + qe_section
    )
    return struct.pack("<I", len(body)) + body


@dataclass(frozen=True)
class ParsedQuote:
    """The parts of an SGX v3 or TDX v4 quote, split but not verified."""

    header: bytes
    report_body: ReportBody | TdReportBody
    isv_signature: bytes
    attestation_public_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes
    #: The report body exactly as it appears in the quote (reserved bytes included).
    report_body_bytes: bytes = b""

    @property
    def signed_bytes(self) -> bytes:
        """What the attestation key signs: the header followed by the report body."""
        return self.header + (self.report_body_bytes or self.report_body.to_bytes())


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise QuoteFormatError("quote is truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self) -> int:
        value: int = struct.unpack("<H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value


def parse_quote(quote: bytes) -> ParsedQuote:
    """Split an SGX v3 or TDX v4 quote into its parts; QuoteFormatError on anything else."""
    reader = _Reader(quote)
    header = reader.take(HEADER_SIZE)
    version, key_type, tee_type = struct.unpack("<HHI", header[:8])
    kind = (version, key_type, tee_type)
    body: ReportBody | TdReportBody
    if kind == (QUOTE_VERSION_3, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_SGX):
        body_bytes = reader.take(REPORT_BODY_SIZE)
        body = ReportBody.from_bytes(body_bytes)
    elif kind == (QUOTE_VERSION_4, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX):
        body_bytes = reader.take(TD_REPORT_BODY_SIZE)
        body = TdReportBody.from_bytes(body_bytes)
    else:
        raise QuoteFormatError(
            f"not an SGX v3 or TDX v4 ECDSA-P256 quote (version {version}, key type "
            f"{key_type}, tee type {tee_type:#x})"
        )
    sig_reader = _Reader(reader.take(reader.u32()))
    isv_signature = sig_reader.take(ECDSA_SIG_SIZE)
    attestation_public_key = sig_reader.take(ECDSA_PUBKEY_SIZE)
    if isinstance(body, TdReportBody):
        if sig_reader.u16() != CERT_DATA_TYPE_QE_REPORT:
            raise QuoteFormatError("TDX quote certification data is not of type 6 (QE report)")
        sig_reader = _Reader(sig_reader.take(sig_reader.u32()))
    qe_report = sig_reader.take(REPORT_BODY_SIZE)
    qe_report_signature = sig_reader.take(ECDSA_SIG_SIZE)
    qe_auth_data = sig_reader.take(sig_reader.u16())
    cert_data_type = sig_reader.u16()
    cert_data = sig_reader.take(sig_reader.u32())
    return ParsedQuote(
        header=header,
        report_body=body,
        isv_signature=isv_signature,
        attestation_public_key=attestation_public_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        cert_data_type=cert_data_type,
        cert_data=cert_data,
        report_body_bytes=body_bytes,
    )


def is_tdx_quote(quote: bytes) -> bool:
    """Whether the header names the TDX TEE type (layout only, nothing verified)."""
    return len(quote) >= 8 and int.from_bytes(quote[4:8], "little") == TEE_TYPE_TDX


def sgx_report_body_offset(version: int) -> int:
    """Where an SGX quote's report body starts: after the header (and v5's descriptor)."""
    return HEADER_SIZE + (V5_BODY_DESCRIPTOR_SIZE if version >= 5 else 0)


def quote_report_data(quote: bytes) -> bytes:
    """The 64-byte report_data of an SGX v3 or TDX v4 quote (layout only, no signature)."""
    if len(quote) < _MIN_QUOTE_SIZE:
        raise QuoteFormatError(
            f"quote is {len(quote)} bytes, shorter than the {_MIN_QUOTE_SIZE}-byte SGX quote"
        )
    version, tee_type = struct.unpack_from("<H2xI", quote, 0)
    layout = _REPORT_DATA_LAYOUTS.get((version, tee_type))
    if layout is None:
        raise QuoteFormatError(
            f"quote version is {version} with TEE type {tee_type:#x}: expected an SGX DCAP "
            "quote version 3 or a TDX quote version 4"
        )
    offset, min_size, name = layout
    if len(quote) < min_size:
        raise QuoteFormatError(
            f"quote is {len(quote)} bytes, shorter than the {min_size}-byte {name} quote"
        )
    return quote[offset : offset + _REPORT_DATA_SIZE]
