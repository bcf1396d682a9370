"""Enclave identities of this installation in simulation mode.

In sim mode MRENCLAVE is a digest of the code that is actually installed (every file
of the ``teepsi`` package) and of the role, so a policy pinned to it pins this exact
code; the server and data-provider roles also differ in ISV_PROD_ID, so one cannot
pose as the other. Under Gramine the real MRENCLAVE comes from gramine-sgx-sign.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from teepsi.attestation.evidence import EnclaveIdentity, Role, TdIdentity

#: Security version of this release; raise it when a fix must lock out older builds.
ISV_SVN = 1

#: MRSIGNER of the simulated enclave signer. A label digest, not a key: nothing in sim
#: mode is signed by a hardware-rooted key anyway.
SIM_MR_SIGNER = hashlib.sha256(b"teepsi INSECURE-SIMULATED enclave signer v1").digest()


def _package_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
    )


@cache
def code_digest() -> bytes:
    """SHA-256 over the relative path, size and content of every installed package file."""
    root = Path(__file__).resolve().parent.parent  # the teepsi package directory
    digest = hashlib.sha256(b"teepsi-code-v1\0")
    for path in _package_files(root):
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "big") + name)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()


def sim_identity(role: Role) -> EnclaveIdentity:
    """The simulated enclave identity of ``role`` for the code installed here."""
    mr_enclave = hashlib.sha256(
        b"teepsi-sim-mrenclave-v1\0" + role.name.encode() + b"\0" + code_digest()
    ).digest()
    return EnclaveIdentity(
        mr_enclave=mr_enclave,
        mr_signer=SIM_MR_SIGNER,
        isv_prod_id=int(role),
        isv_svn=ISV_SVN,
    )


def sim_td_identity() -> TdIdentity:
    """The simulated TDX VM identity of the code installed here, for either role.

    One VM image serves both roles, as on real TDX: MRTD stands for the image (firmware
    and initial memory), RTMR0-2 for firmware configuration, kernel and this code, and
    the role is bound into report_data instead. MRSEAM and TEE_TCB_SVN are the
    simulated platform's (:data:`teepsi.attestation.sim.SIM_MR_SEAM`).
    """
    from teepsi.attestation.sim import SIM_MR_SEAM, SIM_TEE_TCB_SVN

    def register(label: str, *parts: bytes) -> bytes:
        return hashlib.sha384(
            b"teepsi-sim-td-v1\0" + label.encode() + b"\0" + b"".join(parts)
        ).digest()

    return TdIdentity(
        mr_td=register("mrtd", code_digest()),
        rt_mr0=register("rtmr0 firmware configuration"),
        rt_mr1=register("rtmr1 kernel"),
        rt_mr2=register("rtmr2 application", code_digest()),
        mr_seam=SIM_MR_SEAM,
        tee_tcb_svn=SIM_TEE_TCB_SVN,
    )
