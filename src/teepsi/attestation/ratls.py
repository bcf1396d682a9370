"""RA-TLS certificates in Gramine's format: creating them and pulling the evidence out.

An RA-TLS certificate is a self-signed X.509 certificate whose key is bound to an SGX
quote carried in the certificate itself. Current Gramine (v1.8 and later) writes the
binding twice, with two separate quotes:

* the legacy extension (Gramine v1.0+): the raw quote, whose report_data starts with
  SHA-256 of the certificate's DER SubjectPublicKeyInfo. Gramine passes the OID to
  mbedTLS with its own tag and length bytes still attached, so the OID in the
  certificate parses as ``0.6.9.42.840.113741.1337.6``; the intended
  ``1.2.840.113741.1337.6`` is accepted on input too (Gramine's own byte search
  matches both).
* the TCG DICE "tagged evidence" extension ``2.23.133.5.4.9``: CBOR
  ``tag 60000 [bstr quote, bstr claims]`` where ``claims`` is the CBOR map
  ``{"pubkey-hash": bstr(CBOR [hash-alg-id, bstr hash of the SPKI])}`` and the quote's
  report_data starts with SHA-256 of the claims bytes exactly as carried.

A verifier uses the TCG extension when it is present, and then only it: if it is
present but invalid the certificate is refused, never rescued by the legacy one.

Validity: a certificate is valid from an hour before it was made (verifiers' clocks may lag
the server's) for a bounded lifetime, :data:`DEFAULT_LIFETIME` unless the server is given
another, at most :data:`MAX_LIFETIME`; the server stops when its certificate ends, and a new
start makes a new key and certificate. Verifiers pass the time to judge the certificate at
(``extract_evidence(..., at=...)``): now for a live peer, the issue time for a receipt. An
enclave has no trusted clock, so the server's own time is the host's; the check that counts
is the verifier's.

The certificate itself is parsed with the strict DER reader (:mod:`teepsi.attestation.der`)
instead of ``cryptography``'s X.509 loader: Gramine builds linked against mbedTLS before
3.5 wrote an explicit NULL into the ECDSA signature AlgorithmIdentifier, which
``cryptography`` rejects, and such certificates are still in circulation. Quote
signatures are not checked here; that is :mod:`teepsi.attestation.verify`'s job.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from teepsi.attestation import cbor
from teepsi.attestation import der as der_reader
from teepsi.attestation.evidence import REPORT_DATA_SIZE, EvidenceProvider
from teepsi.attestation.quote import QuoteFormatError
from teepsi.attestation.quote import quote_report_data as layout_report_data
from teepsi.errors import TeepsiError
from teepsi.timefmt import iso_utc

LEGACY_QUOTE_OID_GRAMINE = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
LEGACY_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
TCG_DICE_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")

#: CBOR tag Gramine registers for "TEE quote" evidence (IANA CBOR tags registry).
TEE_QUOTE_CBOR_TAG = 60000
PUBKEY_HASH_CLAIM = "pubkey-hash"
#: IANA "Named Information" hash algorithm ids accepted in the pubkey-hash entry, as
#: Gramine's verifier accepts them; Gramine itself always writes SHA-256 (1).
_HASH_ENTRY_ALGORITHMS = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}
_HASH_ENTRY_SHA256 = 1

SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
)
#: How far a certificate's start is set back from its making: verifiers whose clocks lag the
#: server's by up to this much still accept a fresh certificate.
CLOCK_SKEW = timedelta(hours=1)
#: A server's certificate lives this long unless the server is configured otherwise (then at
#: most MAX_LIFETIME): long enough that a restart is a monthly chore, short enough to bound
#: how long a key that leaked from an enclave could be used to pose as it.
DEFAULT_LIFETIME = timedelta(days=30)
MAX_LIFETIME = timedelta(days=90)

_HASH_SIZE = 32  # the binding covers report_data[0:32]; Gramine ignores the rest

_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)

SOURCE_TCG_DICE = "tcg-dice"
SOURCE_LEGACY = "legacy"


class RaTlsError(TeepsiError):
    """The certificate is not a usable RA-TLS certificate; the message is one line."""


@dataclass(frozen=True)
class RaTlsCertificate:
    """A freshly created RA-TLS certificate and its key.

    ``quote`` is the quote of the TCG DICE extension, i.e. the one a verifier extracts.
    """

    certificate_der: bytes
    certificate_pem: bytes
    private_key: ec.EllipticCurvePrivateKey
    quote: bytes
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class ExtractedEvidence:
    """The quote found in an RA-TLS certificate, already checked to bind its key."""

    quote: bytes
    public_key_sha256: bytes
    source: str
    certificate_sha256: bytes
    not_before: datetime
    not_after: datetime


def claims_for_key(public_key: PublicKeyTypes) -> bytes:
    """The serialized claims map Gramine puts in the TCG DICE evidence for ``public_key``."""
    hash_entry = cbor.dumps([_HASH_ENTRY_SHA256, _spki_sha256(public_key)])
    return cbor.dumps({PUBKEY_HASH_CLAIM: hash_entry})


def tagged_evidence(quote: bytes, claims: bytes) -> bytes:
    """The value of the TCG DICE tagged-evidence extension."""
    return cbor.dumps(cbor.CBORTag(TEE_QUOTE_CBOR_TAG, [quote, claims]))


# --- keys and quotes -------------------------------------------------------------------


def _spki_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_sha256(public_key: PublicKeyTypes) -> bytes:
    return hashlib.sha256(_spki_der(public_key)).digest()


def _pad(digest: bytes) -> bytes:
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def report_data_for_key(public_key: PublicKeyTypes) -> bytes:
    """report_data of the legacy quote: SHA-256 of the DER SubjectPublicKeyInfo, zero-padded."""
    return _pad(_spki_sha256(public_key))


def quote_report_data(quote: bytes) -> bytes:
    """:func:`teepsi.attestation.quote.quote_report_data`, failing as RaTlsError."""
    try:
        return layout_report_data(quote)
    except QuoteFormatError as exc:
        raise RaTlsError(str(exc)) from None


def _binds(quote: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(quote_report_data(quote)[:_HASH_SIZE], digest)


# --- creating --------------------------------------------------------------------------


def create_certificate(
    provider: EvidenceProvider,
    *,
    now: datetime | None = None,
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> RaTlsCertificate:
    """Create a Gramine-style RA-TLS certificate for a fresh P-384 key.

    Valid from ``now`` (default: the current time) less :data:`CLOCK_SKEW` until ``now`` plus
    ``lifetime`` (positive, at most :data:`MAX_LIFETIME`). Asks ``provider`` for two quotes,
    as Gramine does: one binding the key directly (legacy extension) and one binding the
    claims (TCG DICE extension).
    """
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise RaTlsError(
            f"certificate lifetime {lifetime} is out of range: more than 0, at most "
            f"{MAX_LIFETIME.days} days"
        )
    start = now if now is not None else datetime.now(UTC)
    if start.tzinfo is None:
        raise ValueError("create_certificate: now must be timezone-aware")
    # X.509 times have whole seconds.
    start = start.astimezone(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP384R1())
    public_key = key.public_key()

    legacy_report_data = report_data_for_key(public_key)
    claims = claims_for_key(public_key)
    tcg_report_data = _pad(hashlib.sha256(claims).digest())
    # No TEE, or not the one named: EvidenceError, which the caller turns into one line.
    legacy_quote = provider.quote(legacy_report_data)
    tcg_quote = provider.quote(tcg_report_data)
    # A provider that ignores report_data would yield a certificate nobody accepts;
    # better to fail here, where the cause is obvious.
    # Only the first 32 bytes are the key binding: a TDX provider puts its role binding
    # in the rest (:func:`teepsi.attestation.evidence.tdx_report_data`).
    for quote, wanted in ((legacy_quote, legacy_report_data), (tcg_quote, tcg_report_data)):
        if quote_report_data(quote)[:_HASH_SIZE] != wanted[:_HASH_SIZE]:
            raise RaTlsError(
                f"evidence provider {provider.name!r} returned a quote without the "
                "requested report_data"
            )

    certificate = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        # Same extensions, order and criticality as Gramine's ra_tls_attest.c.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(LEGACY_QUOTE_OID_GRAMINE, legacy_quote), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(
                TCG_DICE_TAGGED_EVIDENCE_OID, tagged_evidence(tcg_quote, claims)
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return RaTlsCertificate(
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        private_key=key,
        quote=tcg_quote,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
    )


# --- the certificate --------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedCertificate:
    spki_der: bytes
    extensions: dict[str, tuple[bool, bytes]]  # dotted OID -> (critical, value)
    not_before: datetime
    not_after: datetime


def _validity(der: bytes, start: int, end: int) -> tuple[datetime, datetime]:
    times = der_reader.children(der, start, end)
    if len(times) != 2:
        raise RaTlsError("malformed certificate: bad validity")
    not_before, not_after = (der_reader.read_time(tag, der[cs:ce]) for tag, _, cs, ce in times)
    if not_after < not_before:
        raise RaTlsError("malformed certificate: validity ends before it starts")
    return not_before, not_after


def _parse_certificate(der: bytes) -> _ParsedCertificate:
    """The fields of a DER certificate an RA-TLS verifier needs; RaTlsError if malformed."""
    try:
        return _read_certificate(der)
    except der_reader.DerError as exc:
        raise RaTlsError(f"malformed certificate: {exc}") from None


def _read_certificate(der: bytes) -> _ParsedCertificate:
    tag, start, end = der_reader.read_tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise RaTlsError("not a DER X.509 certificate")
    outer = der_reader.children(der, start, end)
    if [child[0] for child in outer] != [0x30, 0x30, 0x03]:
        raise RaTlsError("not a DER X.509 certificate")
    _, _, tbs_start, tbs_end = outer[0]
    fields = der_reader.children(der, tbs_start, tbs_end)
    tags = [field[0] for field in fields]
    index = 1 if tags[:1] == [0xA0] else 0  # explicit version is optional
    # serial, signature, issuer, validity, subject, subjectPublicKeyInfo
    if tags[index : index + 6] != [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]:
        raise RaTlsError("malformed certificate: unexpected TBSCertificate layout")
    rest = tags[index + 6 :]
    if any(t not in (0x81, 0x82, 0xA3) for t in rest) or rest.count(0xA3) > 1:
        raise RaTlsError("malformed certificate: unexpected TBSCertificate layout")
    _, spki_start, _, spki_end = fields[index + 5]
    not_before, not_after = _validity(der, fields[index + 3][2], fields[index + 3][3])

    extensions: dict[str, tuple[bool, bytes]] = {}
    for field_tag, _, content_start, content_end in fields[index + 6 :]:
        if field_tag != 0xA3:
            continue
        wrapper = der_reader.children(der, content_start, content_end)
        if len(wrapper) != 1 or wrapper[0][0] != 0x30:
            raise RaTlsError("malformed certificate: bad extensions list")
        for ext_tag, _, ext_start, ext_end in der_reader.children(
            der, wrapper[0][2], wrapper[0][3]
        ):
            if ext_tag != 0x30:
                raise RaTlsError("malformed certificate: bad extension")
            parts = der_reader.children(der, ext_start, ext_end)
            part_tags = [part[0] for part in parts]
            if part_tags not in ([0x06, 0x04], [0x06, 0x01, 0x04]):
                raise RaTlsError("malformed certificate: bad extension")
            oid = der_reader.oid_text(der[parts[0][2] : parts[0][3]])
            critical = False
            if len(parts) == 3:
                flag = der[parts[1][2] : parts[1][3]]
                if flag not in (b"\x00", b"\xff"):
                    raise RaTlsError("malformed certificate: bad extension criticality")
                critical = flag == b"\xff"
            if oid in extensions:
                raise RaTlsError(f"certificate repeats extension {oid}")
            extensions[oid] = (critical, der[parts[-1][2] : parts[-1][3]])
    return _ParsedCertificate(
        spki_der=der[spki_start:spki_end],
        extensions=extensions,
        not_before=not_before,
        not_after=not_after,
    )


def _certificate_der(certificate: bytes) -> bytes:
    """:func:`teepsi.attestation.der.certificate_der`, failing as RaTlsError."""
    try:
        return der_reader.certificate_der(certificate)
    except der_reader.DerError as exc:
        raise RaTlsError(str(exc)) from None


# --- extracting ------------------------------------------------------------------------


def _checked_public_key_sha256(spki_der: bytes) -> bytes:
    try:
        public_key = serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        raise RaTlsError("certificate public key cannot be parsed") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise RaTlsError(
            f"unsupported public key type {type(public_key).__name__.removesuffix('PublicKey')}: "
            "RA-TLS needs an ECDSA P-256 or P-384 key"
        )
    if not isinstance(public_key.curve, _ACCEPTED_CURVES):
        raise RaTlsError(
            f"unsupported curve {public_key.curve.name}: RA-TLS needs ECDSA P-256 or P-384"
        )
    # Gramine hashes mbedTLS's re-encoding of the key (named curve, uncompressed point);
    # insisting the certificate holds exactly that leaves one meaning for "the key's hash".
    if _spki_der(public_key) != spki_der:
        raise RaTlsError("certificate public key is not in canonical DER form")
    return hashlib.sha256(spki_der).digest()


def _check_claims(claims: bytes, spki_der: bytes) -> None:
    """Refuse claims that do not carry the hash of ``spki_der`` (RaTlsError, one line)."""
    try:
        _check_claims_cbor(claims, spki_der)
    except cbor.CborError as exc:
        raise RaTlsError(str(exc)) from None


def _check_claims_cbor(claims: bytes, spki_der: bytes) -> None:
    major, declared, _ = cbor.read_head(claims, 0, "TCG DICE claims")
    decoded = cbor.loads(claims, "TCG DICE claims")
    if major != 5 or not isinstance(decoded, dict) or not decoded:
        raise RaTlsError("TCG DICE claims are not a non-empty CBOR map")
    if declared != len(decoded):
        raise RaTlsError("TCG DICE claims repeat a key")
    if not all(isinstance(k, str) and k for k in decoded):
        raise RaTlsError("TCG DICE claims have a key that is not a non-empty text string")
    # Gramine skips claims it does not know; "pubkey-hash" is the only one that matters.
    # Unlike Gramine's verifier we insist on it: without it nothing binds the key.
    if PUBKEY_HASH_CLAIM not in decoded:
        raise RaTlsError('TCG DICE claims lack the "pubkey-hash" claim')
    entry_bytes = decoded[PUBKEY_HASH_CLAIM]
    if not isinstance(entry_bytes, bytes) or not entry_bytes:
        raise RaTlsError('"pubkey-hash" claim is not a non-empty byte string')
    entry = cbor.loads(entry_bytes, '"pubkey-hash" claim')
    if not isinstance(entry, list | tuple) or len(entry) != 2:
        raise RaTlsError('"pubkey-hash" claim is not a [hash-alg-id, hash] array')
    algorithm, digest = entry
    # bool is an int subclass; CBOR true/false must not pass for an algorithm id.
    if type(algorithm) is not int or algorithm not in _HASH_ENTRY_ALGORITHMS:
        raise RaTlsError(f'"pubkey-hash" claim uses unsupported hash algorithm {algorithm!r}')
    expected = _HASH_ENTRY_ALGORITHMS[algorithm](spki_der).digest()
    if not isinstance(digest, bytes) or len(digest) != len(expected):
        raise RaTlsError('"pubkey-hash" claim hash has the wrong type or length')
    if not hmac.compare_digest(digest, expected):
        raise RaTlsError("TCG DICE pubkey-hash does not match the certificate's public key")


def _quote_from_tcg_evidence(value: bytes, spki_der: bytes) -> bytes:
    """The quote of TCG DICE tagged evidence, checked to bind the key; RaTlsError if not."""
    try:
        return _read_tcg_evidence(value, spki_der)
    except cbor.CborError as exc:
        raise RaTlsError(str(exc)) from None


def _read_tcg_evidence(value: bytes, spki_der: bytes) -> bytes:
    major, tag, pos = cbor.read_head(value, 0, "TCG DICE evidence")
    if major != 6 or tag != TEE_QUOTE_CBOR_TAG:
        raise RaTlsError(f"TCG DICE evidence is not CBOR tag {TEE_QUOTE_CBOR_TAG} (TEE quote)")
    major, count, pos = cbor.read_head(value, pos, "TCG DICE evidence")
    if major != 4 or count != 2:
        raise RaTlsError("TCG DICE evidence is not a CBOR array [quote, claims]")
    quote, pos = cbor.read_bstr(value, pos, "TCG DICE evidence quote")
    claims, pos = cbor.read_bstr(value, pos, "TCG DICE evidence claims")
    if pos != len(value):
        raise RaTlsError("TCG DICE evidence has trailing bytes")
    if not claims:
        raise RaTlsError("TCG DICE evidence has empty claims")
    if not _binds(quote, hashlib.sha256(claims).digest()):
        raise RaTlsError("TCG DICE quote report_data does not match the hash of its claims")
    _check_claims(claims, spki_der)
    return quote


def _check_validity(parsed: _ParsedCertificate, at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("extract_evidence: at must be timezone-aware")
    when = iso_utc(at)
    if at < parsed.not_before:
        raise RaTlsError(
            f"certificate is not valid before {iso_utc(parsed.not_before)} "
            f"(judged at {when}): check the clocks"
        )
    if at > parsed.not_after:
        raise RaTlsError(f"certificate expired at {iso_utc(parsed.not_after)} (judged at {when})")


def extract_evidence(certificate: bytes, *, at: datetime) -> ExtractedEvidence:
    """Find the quote in an RA-TLS certificate (PEM or DER) and check it binds the key
    and that the certificate is within its validity period at ``at`` (timezone-aware).

    Follows Gramine's verifier: the TCG DICE extension decides when present; otherwise
    the legacy extension is used. The quote's signature is not verified here.
    """
    der = _certificate_der(certificate)
    parsed = _parse_certificate(der)
    public_key_sha256 = _checked_public_key_sha256(parsed.spki_der)
    certificate_sha256 = hashlib.sha256(der).digest()

    def evidence_extension(label: str, *oids: x509.ObjectIdentifier) -> bytes | None:
        found = [parsed.extensions.get(oid.dotted_string) for oid in oids]
        present = [ext for ext in found if ext is not None]
        if len(present) > 1:
            raise RaTlsError(f"certificate has more than one {label} extension")
        if not present:
            return None
        critical, value = present[0]
        # Gramine's verifier refuses these extensions when marked critical.
        if critical:
            raise RaTlsError(f"certificate's {label} extension is marked critical")
        return value

    evidence = evidence_extension("TCG DICE evidence", TCG_DICE_TAGGED_EVIDENCE_OID)
    if evidence is not None:
        quote = _quote_from_tcg_evidence(evidence, parsed.spki_der)
        source = SOURCE_TCG_DICE
    else:
        legacy = evidence_extension("legacy quote", LEGACY_QUOTE_OID_GRAMINE, LEGACY_QUOTE_OID)
        if legacy is None:
            raise RaTlsError("certificate has no RA-TLS evidence extension (TCG DICE or legacy)")
        if not _binds(legacy, public_key_sha256):
            raise RaTlsError("quote report_data does not bind the certificate's public key")
        quote, source = legacy, SOURCE_LEGACY
    # Last, so that a certificate is judged whole whatever its dates (and fuzzing reaches
    # every check above).
    _check_validity(parsed, at)
    return ExtractedEvidence(
        quote=quote,
        public_key_sha256=public_key_sha256,
        source=source,
        certificate_sha256=certificate_sha256,
        not_before=parsed.not_before,
        not_after=parsed.not_after,
    )
