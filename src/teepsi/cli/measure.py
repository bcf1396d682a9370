"""``teepsi measure``: print the dynamic_config.json policy of this installation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from teepsi.cli.common import add_sim_tee_flag, sim_tee
from teepsi.cli.errors import EXIT_OK, UsageError


def run(args: argparse.Namespace) -> int:
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity, sim_td_identity
    from teepsi.attestation.policy import policy_for

    if args.attestation != "sim":
        raise UsageError(
            "--attestation gramine: real measurements come from gramine-sgx-sign "
            "(see deploy/); for a TDX VM image see docs/deploy.md (TDX confidential VM); "
            "`teepsi measure` computes simulated ones"
        )
    if sim_tee(args) == "tdx":
        # One VM image for both roles: its role is bound in the evidence, not measured.
        policy = policy_for(
            [], [("teepsi VM, server and data provider (simulated)", sim_td_identity())]
        )
    else:
        policy = policy_for(
            [
                ("teepsi server (simulated)", sim_identity(Role.SERVER)),
                ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
            ]
        )
    text = json.dumps(policy.to_dict(), indent=4) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    measure = subparsers.add_parser(
        "measure", help="print a dynamic_config.json for this installation"
    )
    measure.add_argument("--attestation", choices=["sim", "gramine"], default="sim")
    add_sim_tee_flag(measure, "whose identities the policy lists (tdx: in tdx_mrs)")
    measure.add_argument("--output", "-o", help="write to this file instead of stdout")
    measure.set_defaults(func=run)
