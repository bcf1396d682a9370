"""The simulated policy the fault, bad-input, leakage and load tests share."""

from __future__ import annotations

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import policy_for


def stable_policy_dict() -> dict[str, object]:
    """This installation's simulated identities with MRENCLAVE not pinned.

    For the fault, bad-input, leakage and load tests: they start many processes, and a
    pinned MRENCLAVE (a digest of the installed files) would turn an edit made while they
    run into a policy mismatch instead of the failure under test.
    """
    data = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    ).to_dict()
    data["verify_mr_enclave"] = "off"
    return data
