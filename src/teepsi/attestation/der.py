"""The one DER reader: strict TLV walking, OIDs and X.509 times, nothing else.

Strict on purpose (minimal lengths, short tags, minimal OID arcs): an RA-TLS
certificate has one meaning for every byte, so "the key's hash" has one meaning too.
Certificates are walked with this instead of ``cryptography``'s X.509 loader where that
loader refuses certificates still in circulation (Gramine built against mbedTLS before
3.5 wrote an explicit NULL into the ECDSA AlgorithmIdentifier).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

from teepsi.errors import TeepsiError

SEQUENCE = 0x30
BIT_STRING = 0x03
NULL = 0x05


class DerError(TeepsiError, ValueError):
    """The bytes are not the DER expected; the message is one line."""


def read_tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read one DER TLV at ``pos``: (tag, content start, content end)."""
    if pos + 2 > end:
        raise DerError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DerError("unsupported DER tag")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise DerError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise DerError("non-minimal DER length")
        pos += count
    if pos + length > end:
        raise DerError("truncated DER")
    return tag, pos, pos + length


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs inside [start, end): (tag, TLV start, content start, content end)."""
    children = []
    pos = start
    while pos < end:
        tag, content_start, content_end = read_tlv(data, pos, end)
        children.append((tag, pos, content_start, content_end))
        pos = content_end
    return children


def oid_text(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise DerError("bad extension OID")
    arcs: list[int] = []
    value = 0
    arc_start = True
    for byte in content:
        if arc_start and byte == 0x80:
            raise DerError("non-minimal extension OID")
        value = (value << 7) | (byte & 0x7F)
        arc_start = not byte & 0x80
        if arc_start:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


def read_time(tag: int, content: bytes) -> datetime:
    """RFC 5280 4.1.2.5: UTCTime YYMMDDHHMMSSZ (YY < 50 is 20YY), GeneralizedTime
    YYYYMMDDHHMMSSZ; no fractions, no offsets."""
    text = content.decode("ascii", errors="replace")
    digits = {_UTC_TIME: 12, _GENERALIZED_TIME: 14}.get(tag)
    if digits is None or len(text) != digits + 1 or not text[:-1].isdigit() or text[-1] != "Z":
        raise DerError("bad validity time")
    if tag == _UTC_TIME:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise DerError("bad validity time") from None


def encode(tag: int, content: bytes) -> bytes:
    """One DER TLV with a minimal length."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def certificate_der(certificate: bytes) -> bytes:
    """A certificate as DER, given DER or PEM (the first CERTIFICATE block)."""
    data = bytes(certificate)
    # DER starts with a SEQUENCE tag. Looking for the PEM marker instead would misfire:
    # DCAP quotes embed the PCK chain as PEM text, so DER RA-TLS certificates contain it.
    if not data.startswith(b"\x30"):
        match = re.search(
            rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.DOTALL
        )
        if match is None:
            raise DerError("PEM input has no CERTIFICATE block")
        try:
            return base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error:
            raise DerError("PEM certificate block is not valid base64") from None
    return data
