"""The ``teepsi`` command line: a thin layer over :mod:`teepsi.server` and :mod:`teepsi.client`.

One module per command group, each with ``register(subparsers)``: arguments, printing and
exit codes (:mod:`teepsi.cli.errors`) only; the work is the library's. Settings come from
flags, ``TEEPSI_*`` variables and ``--run-config`` (:mod:`teepsi.cli.settings`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from teepsi._version import __version__
from teepsi.cli import contract, demo, health, measure, party, server
from teepsi.cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OneLineParser,
    UsageError,
    usage_json_line,
)
from teepsi.cli.flag_hints import with_flag_hints
from teepsi.cli.settings import (
    ENV_PREFIX,
    TRUST_FLAGS,
    apply_settings,
    explicit_dests,
    parser_tree,
    run_keys,
)

__all__ = ["TRUST_FLAGS", "UsageError", "build_parser", "main", "parse_settings", "run_keys"]


def build_parser() -> argparse.ArgumentParser:
    from teepsi.cli.evidence import register as register_evidence_tools

    parser = OneLineParser(
        prog="teepsi",
        description="Multi-party private set intersection inside attested enclaves.",
    )
    parser.add_argument("--version", action="version", version=f"teepsi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for group in (server, party, health, measure, demo, contract):
        group.register(sub)
    register_evidence_tools(sub)
    return parser


def parse_settings(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    parsed: argparse.Namespace | None = None,
) -> argparse.Namespace:
    """The command line, with ``server`` and ``client`` settings from the environment and the
    settings file merged in (flag > environment > file > default)."""
    args = parsed if parsed is not None else build_parser().parse_args(argv)
    args.explicit = explicit_dests(build_parser(), argv)
    if getattr(args, "subparser", None) is not None:
        apply_settings(args, environ)
    return args


def _json_usage_role(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> str | None:
    """The command whose usage errors are JSON lines: one asked for ``--log-format json``
    (as a flag or, for a command with settings, as TEEPSI_LOG_FORMAT); None for text.

    Read from the raw arguments, since argparse's error comes before any parse result."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if a in commands), None)
    if command is None or "--log-format" not in commands[command]._option_string_actions:
        return None
    chosen = None
    for i, word in enumerate(argv):
        if word == "--log-format" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif word.startswith("--log-format="):
            chosen = word.partition("=")[2]
    if chosen is None and commands[command].get_default("subparser") is not None:
        chosen = environ.get(ENV_PREFIX + "LOG_FORMAT", "").strip().lower()
    return command if chosen == "json" else None


def main(argv: Sequence[str] | None = None) -> int:
    # Before numpy loads: its BLAS is unused here, and would start a thread per core
    # (an enclave's sgx.max_threads is finite; the deploy manifests pin this too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    json_role = _json_usage_role(parser, sys.argv[1:] if argv is None else argv, os.environ)
    for each in parser_tree(parser):
        if isinstance(each, OneLineParser):
            each.error_role = json_role
    args = parser.parse_args(argv)
    try:
        args = parse_settings(argv, os.environ, parsed=args)
        code: int = args.func(args)
    except UsageError as exc:
        # Often a library error's text: named in the command line's words (flags).
        message = str(exc) if exc.in_cli_terms else with_flag_hints(str(exc))
        if getattr(args, "log_format", "text") == "json":
            # As the command's other errors: one JSON line, as its log handler writes them.
            print(usage_json_line(args.command, message), file=sys.stderr)
        else:
            print(f"teepsi {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        # The exception's text, if any, is what the interrupted step left to pick up.
        detail = f"; {exc}" if str(exc) else ""
        print(f"teepsi {args.command}: interrupted (Ctrl-C){detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code
