"""Flags several commands share, and what each means for the run: logging, the trust
flags and the policy they widen, the simulated TEE, and the collateral files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.attestation.providers import SIM_TEES
from teepsi.cli.errors import UsageError

if TYPE_CHECKING:
    from teepsi.attestation.policy import Policy


def setup_logging(role: str, verbose: bool, quiet: bool = False, log_format: str = "text") -> None:
    from teepsi.cli.flag_hints import FlagHintFilter
    from teepsi.logformat import setup_logging as setup_log_handler

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    setup_log_handler(role, level, log_format)
    # Library errors and warnings name settings as the API does; the user needs the flags.
    for handler in logging.getLogger().handlers:
        handler.addFilter(FlagHintFilter())


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    from teepsi.logformat import LOG_FORMATS

    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default): a UTC timestamp, then the line; json: one object per line "
        "(ts, level, logger, msg, role, and structured fields) for log shippers; "
        "a client then draws no progress bars",
    )


def load_policy(path: str, args: argparse.Namespace) -> Policy:
    """The policy file, with the TCB statuses the --allow-* flags accept added to it."""
    from teepsi.attestation.policy import Policy, PolicyError, TcbAllowances

    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    widened = TcbAllowances(
        outdated=policy.tcb.outdated or args.allow_outdated_tcb,
        hw_config_needed=policy.tcb.hw_config_needed or args.allow_hw_config,
        sw_hardening_needed=policy.tcb.sw_hardening_needed or args.allow_sw_hardening,
    )
    return policy.with_tcb(widened)


def add_trust_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-simulated",
        action="store_true",
        help="accept SIMULATED peer evidence (no hardware guarantee; for tests and demos only)",
    )
    parser.add_argument(
        "--allow-outdated-tcb",
        action="store_true",
        help="accept peers whose TCB status is OutOfDate",
    )
    parser.add_argument(
        "--allow-hw-config",
        action="store_true",
        help="accept peers whose TCB status needs platform configuration",
    )
    parser.add_argument(
        "--allow-sw-hardening",
        action="store_true",
        help="accept peers whose TCB status needs software hardening",
    )


def add_signer_flags(parser: argparse.ArgumentParser) -> None:
    """How an offline check judges the server enclave that signed
    (:func:`teepsi.contract.offline.judge_signing_server`)."""
    parser.add_argument(
        "--config", help="policy the signing server enclave must satisfy (dynamic_config.json)"
    )
    parser.add_argument(
        "--allow-simulated", action="store_true", help="accept a simulated server enclave"
    )


def sim_tee(args: argparse.Namespace) -> str:
    """``--sim-tee``, which only means something with ``--attestation sim``."""
    chosen: str | None = args.sim_tee
    if chosen is not None and args.attestation != "sim":
        raise UsageError(
            f"--sim-tee {chosen}: only with --attestation sim (--attestation "
            f"{args.attestation} uses the real TEE it names)"
        )
    return chosen or "sgx"


def add_sim_tee_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--sim-tee",
        choices=list(SIM_TEES),
        help=f"with --attestation sim: the TEE to simulate, {what} (default sgx)",
    )


def collateral_file(path: str | None) -> str | None:
    if path is None:
        return None
    from teepsi.attestation.collateral import CollateralError, load_collateral_file

    try:
        return load_collateral_file(path)
    except CollateralError as exc:
        raise UsageError(str(exc)) from None


def collateral_state(args: argparse.Namespace, role: str) -> Path:
    """--collateral-state, or the CLI's default file for ``role``; checked readable now."""
    from teepsi.attestation.collateral import (
        CollateralError,
        CollateralFreshness,
        default_state_path,
    )

    try:
        path = (
            Path(args.collateral_state)
            if args.collateral_state is not None
            else default_state_path(role)
        )
        CollateralFreshness(path)  # a bad file is a usage error before anything runs
    except CollateralError as exc:
        raise UsageError(f"--collateral-state: {exc}") from None
    return path


def add_collateral_state_flag(parser: argparse.ArgumentParser, role: str, whose: str) -> None:
    parser.add_argument(
        "--collateral-state",
        metavar="FILE",
        help=f"remembers the newest collateral each {whose} platform showed, so older "
        "collateral is refused after a restart too (default "
        f"$XDG_STATE_HOME/teepsi/{role}-collateral-state.json; under Gramine a file on "
        "an encrypted mount)",
    )


def add_run_config_flag(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--run-config",
        help="TOML settings file: any flag but the trust flags, as key = value with _ for - "
        f"({example}); TEEPSI_<KEY> variables override it and flags override both "
        "(docs/configuration.md). Default $TEEPSI_RUN_CONFIG",
    )
