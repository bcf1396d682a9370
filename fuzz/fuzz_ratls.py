#!/usr/bin/env python3
"""Fuzz RA-TLS certificate parsing and evidence extraction.

Targets, on every input:

* :func:`teepsi.attestation.ratls.extract_evidence` on the bytes as a certificate (PEM or
  DER), which is what a client runs on the certificate a server presents, before any
  quote is verified. When a certificate is accepted, the result must be consistent: the
  quote binds what extraction says it binds.
* ``ratls._check_claims`` on the bytes as the CBOR claims of TCG DICE evidence, for a
  fixed P-384 key. In a certificate the claims sit behind a SHA-256 binding (the quote's
  report_data must hash them), which mutation cannot keep intact, so without this target
  the CBOR decoding of claims would hardly ever be fuzzed.

Only :class:`~teepsi.attestation.ratls.RaTlsError` may escape; anything else (IndexError,
a CBOR library error, RecursionError, ...) is a bug.

    python fuzz/fuzz_ratls.py -max_total_time=3600 fuzz/work/ratls fuzz/corpus/ratls

See docs/fuzzing.md.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from datetime import UTC, datetime

import atheris
from _support import amplifying_mutator, guard, with_defaults
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.attestation.ratls import (
        SOURCE_LEGACY,
        SOURCE_TCG_DICE,
        RaTlsError,
        _certificate_der,
        _check_claims,
        extract_evidence,
        quote_report_data,
    )

#: Inside every seed's validity (fuzz/make_corpus.py), so the seeds reach the accepting path.
JUDGED_AT = datetime(2024, 1, 2, tzinfo=UTC)

# The key of the corpus's small TCG DICE seeds (same derivation as fuzz/make_corpus.py), so
# that the claims seed "claims_p384.cbor" is accepted as is.
_CLAIMS_KEY = ec.derive_private_key(
    int.from_bytes(hashlib.sha512(b"fuzz ratls tcg").digest(), "big") % (2**250) + 1,
    ec.SECP384R1(),
)
CLAIMS_SPKI = _CLAIMS_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _claims(data: bytes) -> None:
    try:
        _check_claims(data, CLAIMS_SPKI)
    except RaTlsError as exc:
        assert "\n" not in str(exc), f"RaTlsError message is not one line: {exc!r}"


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    _claims(data)
    try:
        evidence = extract_evidence(data, at=JUDGED_AT)
    except RaTlsError as exc:
        assert "\n" not in str(exc), f"RaTlsError message is not one line: {exc!r}"
        return
    # Accepted: the answer must be self-consistent.
    der = _certificate_der(data)
    assert evidence.certificate_sha256 == hashlib.sha256(der).digest()
    assert len(evidence.public_key_sha256) == 32
    assert evidence.source in (SOURCE_TCG_DICE, SOURCE_LEGACY)
    report_data = quote_report_data(evidence.quote)  # accepted quotes have the v3 layout
    if evidence.source == SOURCE_LEGACY:
        assert hmac.compare_digest(report_data[:32], evidence.public_key_sha256)


def main() -> None:
    argv = with_defaults(sys.argv, "ratls", max_len=65536)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
