"""The join transcript a data provider binds into its evidence.

The digest is the provider quote's report_data, so a quote proves: this enclave
answered this server's fresh nonce, for this server certificate, this job and party
name (and job spec, when there is one), and holds this key. Replaying it to another
server, job or party fails.
"""

from __future__ import annotations

import hashlib

TRANSCRIPT_LABEL = b"teepsi-join-transcript-v1"


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def join_transcript_digest(
    *,
    nonce: bytes,
    server_certificate_sha256: bytes,
    job_id: str,
    party_name: str,
    party_public_key_sha256: bytes,
    spec_sha256: bytes = b"",
) -> bytes:
    """64 bytes (SHA-512) over the length-prefixed transcript fields."""
    parts = (
        TRANSCRIPT_LABEL,
        nonce,
        server_certificate_sha256,
        job_id.encode(),
        party_name.encode(),
        party_public_key_sha256,
        spec_sha256,
    )
    return hashlib.sha512(b"".join(_field(p) for p in parts)).digest()
