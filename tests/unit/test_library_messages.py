"""Library messages name settings in the library's own terms; only the CLI names flags.

The CLI (:mod:`teepsi.cli.flag_hints`) rewrites those terms into flags where it prints an
error or a log line, so a ``teepsi`` user still reads the flag to change.
"""

from __future__ import annotations

import ast
import io
import logging
import re
from pathlib import Path

import pytest

import teepsi
from teepsi.cli.flag_hints import FLAG_HINTS, FlagHintFilter, with_flag_hints

PACKAGE = Path(teepsi.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")

#: Modules outside the CLI whose messages may still name flags, and those flags.
ALLOWED_FLAGS: dict[str, set[str]] = {
    # Command lines, not messages: the demo starts `teepsi` processes.
    "demo.py": {
        "--allow-simulated",
        "--announce",
        "--attestation",
        "--audit-log",
        "--config",
        "--contract",
        "--data",
        "--drain-seconds",
        "--host",
        "--key-file",
        "--name",
        "--out",
        "--output",
        "--parties",
        "--quiet",
        "--receipt",
        "--sim-tee",
        "--spec",
        "--timeout",
    },
    # Sent to remote parties, who run `teepsi client` (out of scope: issue #12 point 2).
    "server/admission.py": {"--job", "--key", "--name", "--normalize", "--parties", "--spec"},
    "server/jobs.py": {"--resume"},
    "server/limits.py": {"--max-jobs-per-address", "--max-jobs-per-party"},
    "server/party_auth.py": {"--key-file"},
    "server/service.py": {
        "--attestation",
        "--config",
        "--no-client-attestation",
        "--resume-file",
    },
    "server/streams.py": {"--max-items"},
    # The remote refusal of simulated evidence: read by a party, it names the server
    # operator's switch and the party's own.
    "server/app.py": {"--allow-simulated"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: documentation, not messages."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _help_texts(tree: ast.AST) -> set[int]:
    """ids of ``help=`` arguments' strings: a flag's own help names flags."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "help"
        for inner in ast.walk(node.value)
    }


def flags_named(source: str) -> set[str]:
    """The flags the string constants and f-strings of this source name."""
    tree = ast.parse(source)
    skipped = _docstrings(tree) | _help_texts(tree)
    return {
        flag
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in skipped
        for flag in FLAG.findall(node.value)
    }


def _library_modules() -> dict[str, Path]:
    return {
        path.relative_to(PACKAGE).as_posix(): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "cli" and "_pb2" not in path.name
    }


def test_library_messages_name_no_flags():
    named = {
        name: flags_named(path.read_text(encoding="utf-8"))
        for name, path in _library_modules().items()
    }
    unexpected = {
        name: sorted(flags - ALLOWED_FLAGS.get(name, set()))
        for name, flags in named.items()
        if flags - ALLOWED_FLAGS.get(name, set())
    }
    assert not unexpected, f"name the setting in library terms, see FLAG_HINTS: {unexpected}"
    # An allowance no longer used goes, so that the list only shrinks.
    stale = {
        name: sorted(flags - named.get(name, set()))
        for name, flags in ALLOWED_FLAGS.items()
        if flags - named.get(name, set())
    }
    assert not stale, f"allowed but no longer named: {stale}"


def test_the_scan_sees_messages_but_not_documentation():
    source = '''
"""Module docs name --docs."""
def f(parser, host):
    """Function docs name --docs too."""
    parser.add_argument("--flag", help="set --help-text")
    raise ValueError(f"--host {host!r}: bad")
'''
    assert flags_named(source) == {"--flag", "--host"}


def test_every_flag_hint_is_a_term_the_library_uses():
    text = "\n".join(path.read_text(encoding="utf-8") for path in _library_modules().values())
    unused = [term for term in FLAG_HINTS if term not in text]
    assert not unused, unused


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        (
            "the server address 'x': expected HOST:PORT, for example localhost:50051",
            "--host 'x': expected HOST:PORT, for example localhost:50051",
        ),
        (
            "refusing the server: SIMULATED; set allow_simulated to accept simulated evidence "
            "(test runs only)",
            "refusing the server: SIMULATED; pass --allow-simulated to "
            "accept simulated evidence (test runs only)",
        ),
        ("PCCS TLS (or set insecure_pccs_tls)", "PCCS TLS (or pass --insecure-pccs-tls)"),
        # The QCNL file's own key keeps its name; the party's setting is the flag.
        (
            "qcnl.conf: no PCCS_URL (pccs_url) set (set pccs_url or PCCS_URL in qcnl.conf)",
            "qcnl.conf: no PCCS_URL (pccs_url) set (set --pccs-url or PCCS_URL in qcnl.conf)",
        ),
        (
            "parts: a directory of Parquet files: set the table format to parquet to read them",
            "parts: a directory of Parquet files: pass --format parquet to read them",
        ),
        ("d.txt: no such file; check the data path", "d.txt: no such file; check the --data path"),
        ("over the memory budget, and cannot", "over --memory-budget, and cannot"),
        ("gave up after this party's timeout of 5 s", "gave up after --timeout 5 s"),
        ("party_count must be at least 1", "--parties must be at least 1"),
        # Whole terms only: another identifier that contains a term stays as it is.
        ("max_party_count and my_allow_simulated_x", "max_party_count and my_allow_simulated_x"),
    ],
)
def test_cli_names_the_flag_for_a_library_term(library, cli):
    assert with_flag_hints(library) == cli


def test_cli_log_lines_name_flags():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(FlagHintFilter())
    logger = logging.getLogger("teepsi.test_flag_hints")
    logger.addHandler(handler)
    try:
        logger.warning("%s: trusted only because allow_simulated was given", "SIMULATED")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "SIMULATED: trusted only because --allow-simulated was given\n"
