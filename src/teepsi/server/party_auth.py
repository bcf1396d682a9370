"""Authenticating a joining party, before any quote is checked: its key's form, its
signature over the join transcript, and its listing in the job spec it carries."""

from __future__ import annotations

import hashlib
import hmac

from teepsi.contract.party_keys import PartyKeyError, canonical_public_key_der
from teepsi.contract.party_keys import verify as verify_party_signature
from teepsi.contract.spec import JobSpec, SpecError
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server.errors import ErrorKind, Refusal, ServiceError


def party_key_sha256(public_key_der: bytes) -> bytes:
    """SHA-256 of the party's key, once the contract's key rules accept it."""
    try:
        canonical = canonical_public_key_der(public_key_der)
    except PartyKeyError as exc:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"party_public_key: {exc}") from None
    if canonical != public_key_der:
        # The transcript hashes the bytes sent, the spec compares canonical ones: one form.
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT, "party_public_key is not canonical SubjectPublicKeyInfo DER"
        )
    return hashlib.sha256(public_key_der).digest()


def check_possession(public_key_der: bytes, signature: bytes, message: bytes) -> None:
    """The party signs the transcript digest: proof it holds the key its quote binds.

    The contract's one key verification (its key types, curves and signature scheme).
    """
    try:
        valid = verify_party_signature(public_key_der, signature, message)
    except PartyKeyError as exc:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"party_public_key: {exc}") from None
    if not valid:
        raise ServiceError(ErrorKind.PERMISSION_DENIED, "join transcript signature does not verify")


def spec_of_join(request: pb.JoinRequest) -> JobSpec | None:
    """The spec a join carries, checked against the party: listed, with that key."""
    if not request.job_spec:
        return None
    try:
        spec = JobSpec.from_canonical(request.job_spec)
    except SpecError as exc:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
    if spec.job_id != request.job_id:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"job id {request.job_id!r} is not the spec's job id {spec.job_id!r}",
            Refusal.SPEC_MISMATCH,
        )
    listed = spec.party(request.party_name)
    if listed is None:
        raise ServiceError(
            ErrorKind.PERMISSION_DENIED,
            f"party {request.party_name!r} is not listed in job {spec.job_id}'s spec",
        )
    if not hmac.compare_digest(listed.public_key, request.party_public_key):
        raise ServiceError(
            ErrorKind.PERMISSION_DENIED,
            f"the key presented for party {request.party_name!r} is not the one its job "
            "spec lists (use that party's --key-file)",
        )
    if request.party_count != len(spec.parties):
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"job {spec.job_id}'s spec lists {len(spec.parties)} parties, "
            f"not {request.party_count}",
            Refusal.SPEC_MISMATCH,
        )
    return spec
