"""A data provider's settings for one run, and the resume token that lets a quick-mode
party fetch its result again after its client died."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teepsi.attestation.evidence import EvidenceProvider
from teepsi.attestation.policy import Policy
from teepsi.contract.party_keys import PartyPrivateKey
from teepsi.contract.spec import JobSpec
from teepsi.errors import TeepsiError


@dataclass(frozen=True)
class PartyConfig:
    host: str
    policy: Policy
    name: str
    party_count: int
    job_id: str = "default"
    #: "gramine", "tdx", "sim" or "none" (run outside a TEE; the server must allow it).
    #: The default is real hardware, as on the command line: simulation is always asked for.
    attestation: str = "gramine"
    #: The TEE ``attestation="sim"`` simulates: "sgx" or "tdx".
    sim_tee: str = "sgx"
    allow_simulated: bool = False
    timeout: float = 600.0
    progress: bool = False
    #: The agreed job spec, and this party's key listed in it (contract mode).
    spec: JobSpec | None = None
    party_key: PartyPrivateKey | None = None
    #: Collateral for checking the server's quote: a file's contents, or fetched from a
    #: PCCS; by default the copy the server staples to its evidence (Intel-signed, so
    #: relaying it through the untrusted host is safe).
    server_collateral_json: str | None = None
    pccs_url: str | None = None
    insecure_pccs_tls: bool = False
    #: Fetch the result of an earlier run of this party instead of joining and uploading:
    #: under a spec the party's key re-authenticates it (see ``resume_token`` otherwise).
    resume: bool = False
    #: Quick mode's way back in: the session an earlier run of this party saved.
    resume_token: ResumeToken | None = None
    #: The server platforms' collateral rollback state, kept across runs; None keeps it
    #: in memory for this run only (the CLI passes a file).
    collateral_state: Path | None = None
    #: Evidence provider override (as the server's); default from ``attestation``.
    provider: EvidenceProvider | None = None


class ResumeTokenError(TeepsiError, ValueError):
    """A resume file that cannot be read or does not fit this run; one line."""


@dataclass(frozen=True)
class ResumeToken:
    """What a quick-mode party needs to fetch its result again after its client died.

    The session token is a bearer secret for the party's slot: it is only ever sent over
    a channel pinned to the attested server it was issued by, and the file is 0600.
    """

    host: str
    job_id: str
    party_name: str
    session_token: bytes
    key_seeds: tuple[int, int]
    server_certificate_sha256: bytes

    VERSION = 1

    def to_json(self) -> str:
        return json.dumps(
            {
                "teepsi_resume": self.VERSION,
                "host": self.host,
                "job_id": self.job_id,
                "party_name": self.party_name,
                "session_token": self.session_token.hex(),
                "key_seeds": list(self.key_seeds),
                "server_certificate_sha256": self.server_certificate_sha256.hex(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> ResumeToken:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("teepsi_resume") != cls.VERSION:
                raise ValueError("not a teepsi resume file")
            seeds = data["key_seeds"]
            if not (
                isinstance(seeds, list)
                and len(seeds) == 2
                and all(isinstance(v, int) and 0 <= v < 2**64 for v in seeds)
            ):
                raise ValueError("bad key_seeds")
            return cls(
                host=str(data["host"]),
                job_id=str(data["job_id"]),
                party_name=str(data["party_name"]),
                session_token=bytes.fromhex(data["session_token"]),
                key_seeds=(seeds[0], seeds[1]),
                server_certificate_sha256=bytes.fromhex(data["server_certificate_sha256"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ResumeTokenError(f"{where}: not a valid teepsi resume file ({exc})") from None


#: Called once a quick-mode party's upload is complete: save this to resume.
ResumeSaver = Callable[[ResumeToken], None]
