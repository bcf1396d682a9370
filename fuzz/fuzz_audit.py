#!/usr/bin/env python3
"""Fuzz audit log verification.

Target: :func:`verify_audit_log` on the bytes as a log file (what ``teepsi audit verify``
and a restarting server read, written by whoever controls the host); only ``AuditError``
may escape. An accepted log verifies again against its own head (``expect_head`` and
``expect_entry``), reports no more signed lines than it has, and a server can continue it.

    python fuzz/fuzz_audit.py -max_total_time=3600 fuzz/work/audit fuzz/corpus/audit

See docs/fuzzing.md.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris
from _support import amplifying_mutator, guard, with_defaults

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.contract.audit import AuditError, AuditHead, AuditLog, verify_audit_log

_DIRECTORY = tempfile.mkdtemp(prefix="fuzz-audit-")
_PATH = os.path.join(_DIRECTORY, "audit.jsonl")


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    with open(_PATH, "wb") as handle:
        handle.write(data)
    try:
        summary = verify_audit_log(_PATH)
    except AuditError as exc:
        assert "\n" not in str(exc), f"AuditError message is not one line: {exc!r}"
        return
    assert 0 <= summary.signed_entries <= summary.entries, "signed more lines than there are"
    assert summary.entries == data.count(b"\n"), "entries is not the number of lines"
    head = AuditHead(entries=summary.entries, hash=summary.head)
    again = verify_audit_log(_PATH, expect_head=summary.head, expect_entry=head)
    assert again == summary, "a second verification differs"
    with AuditLog(_PATH) as log:  # a server continues an accepted log
        assert log.position() == head


def main() -> None:
    argv = with_defaults(sys.argv, "audit", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
