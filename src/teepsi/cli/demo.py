"""``teepsi demo``: the toy PSI run locally in sim mode (:mod:`teepsi.demo`)."""

from __future__ import annotations

import argparse

from teepsi.attestation.providers import SIM_TEES
from teepsi.cli.common import add_log_flags, setup_logging


def run(args: argparse.Namespace) -> int:
    from teepsi.demo import run_contract_demo, run_demo

    setup_logging("demo", args.verbose, log_format=args.log_format)
    if args.contract:
        return run_contract_demo(verbose=args.verbose)
    return run_demo(parties=args.parties, verbose=args.verbose, tee=args.tee)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="run the seed's toy PSI locally in sim mode")
    demo.add_argument("--parties", type=int, choices=[2, 3], default=3)
    demo.add_argument(
        "--tee",
        choices=list(SIM_TEES),
        default="sgx",
        help="the simulated TEE every role runs in (default sgx)",
    )
    demo.add_argument(
        "--contract",
        action="store_true",
        help="the job-contract example: three parties under a spec, one not a recipient",
    )
    add_log_flags(demo)
    demo.set_defaults(func=run)
