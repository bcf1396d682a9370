"""Exit codes, the CLI's usage error, and argparse's own usage errors as one line.

Exit codes: 0 success; 1 the run failed or a peer was refused; 2 bad usage or input;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from teepsi.errors import TeepsiError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(TeepsiError):
    """Bad flags or input files; exit code 2.

    Its text often carries a library error's, which names settings in the library's terms;
    the CLI rewrites those into flags (:mod:`teepsi.cli.flag_hints`). ``in_cli_terms``
    marks a message already in the command line's words that must stay as written (the
    settings errors name run-config keys such as ``allow_simulated`` on purpose).
    """

    def __init__(self, message: str, *, in_cli_terms: bool = False) -> None:
        super().__init__(message)
        self.in_cli_terms = in_cli_terms


def usage_json_line(role: str, message: str) -> str:
    """A usage error as the one JSON log line ``--log-format json`` promises (no newline)."""
    from teepsi.logformat import json_log_line

    return json_log_line(role, f"error: {message}", exit_code=EXIT_USAGE)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what, and where to look), exit 2.

    ``error_role`` set (by :func:`teepsi.cli.main`, when the command line asks for
    ``--log-format json``) makes that line a JSON log object for the role, as every other
    error of the command is.
    """

    error_role: str | None = None

    def error(self, message: str) -> NoReturn:
        line = f"{message} (see {self.prog} --help)"
        if self.error_role is not None:
            self.exit(EXIT_USAGE, usage_json_line(self.error_role, line) + "\n")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {line}\n")
