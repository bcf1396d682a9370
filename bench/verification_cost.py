"""What the one verification path costs per join (in-process, simulated evidence).

    .venv/bin/python bench/verification_cost.py [--rounds N]

Prints milliseconds per call, the mean of N calls: refusing a join whose quote does not
bind it (checked on the quote's bytes before anything else), the dcap-qvl verification a
refused join cost before that order, and accepting a join with the rollback state in
memory and in a file (re-read under its lock on every accepted peer).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from teepsi.attestation.collateral import FRESHNESS_TOLERANCE_SECONDS, CollateralFreshness
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import policy_for
from teepsi.attestation.sim import SimPlatform
from teepsi.attestation.trust import verify_trusted_quote


def _ms(call: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - start) / rounds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    rounds = parser.parse_args().rounds
    logging.disable(logging.WARNING)  # the simulated-evidence warning on every call
    policy = policy_for(
        [("server", sim_identity(Role.SERVER)), ("provider", sim_identity(Role.DATA_PROVIDER))]
    )
    platform = SimPlatform()
    report_data = bytes(range(64))
    quote = platform.quote(sim_identity(Role.DATA_PROVIDER), report_data)
    collateral = platform.collateral_json()
    in_memory = PeerVerifier(policy, allow_simulated=True)

    def refused() -> None:
        with contextlib.suppress(PeerRejected):
            in_memory.verify_bound_quote(quote, collateral, bytes(64), what="provider")

    with tempfile.TemporaryDirectory() as folder:
        state = CollateralFreshness(
            Path(folder) / "state.json", tolerance_seconds=FRESHNESS_TOLERANCE_SECONDS
        )
        with_file = PeerVerifier(policy, allow_simulated=True, freshness=state)
        rows = {
            "refuse a join its quote does not bind": refused,
            "dcap-qvl verification alone": lambda: verify_trusted_quote(
                quote, collateral, allow_simulated=True
            ),
            "accept, rollback state in memory": lambda: in_memory.verify_bound_quote(
                quote, collateral, report_data, what="provider"
            ),
            "accept, rollback state in a file": lambda: with_file.verify_bound_quote(
                quote, collateral, report_data, what="provider"
            ),
        }
        for name, call in rows.items():
            print(f"{name:40s} {_ms(call, rounds):8.3f} ms")


if __name__ == "__main__":
    main()
