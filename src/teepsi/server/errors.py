"""Errors the service reports, independent of gRPC so the job logic stays pure."""

from __future__ import annotations

from enum import Enum

from teepsi.errors import TeepsiError


class ErrorKind(Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    NOT_FOUND = "NOT_FOUND"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"


class Refusal(Enum):
    """Why a call was refused, as the metrics count it: a fixed set, never free text."""

    POLICY = "policy"
    TCB_STATUS = "tcb_status"
    ATTESTATION = "attestation"
    SPEC_MISMATCH = "spec_mismatch"
    LIMITS = "limits"
    BAD_REQUEST = "bad_request"
    AUTHENTICATION = "authentication"
    JOB_STATE = "job_state"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


class ServiceError(TeepsiError):
    """A refusal with a gRPC-style status kind and a one-line message.

    ``reason`` names it for the metrics where the kind alone does not (a policy or TCB
    refusal, a spec mismatch); None takes the kind's usual reason."""

    def __init__(self, kind: ErrorKind, message: str, reason: Refusal | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.reason = reason
