"""The naming rules of contracts: job ids and party names, audit event and field names.

Each rule is defined here once and used by name: the spec reader, receipts, the audit
log, the server and the CLI all check (and explain) a job id the same way. Use
``fullmatch`` with the patterns.
"""

from __future__ import annotations

import re
from typing import TypeGuard

__all__ = [
    "AUDIT_EVENT_PATTERN",
    "AUDIT_FIELD_PATTERN",
    "IDENTIFIER_PATTERN",
    "IDENTIFIER_RULE",
    "is_identifier",
]

#: Job ids and party names: 1-128 letters, digits, '.', '_', '@' or '-', not starting
#: with a sign (so a name never reads as a command-line option).
IDENTIFIER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")

#: :data:`IDENTIFIER_PATTERN` in words, for the message that refuses a name.
IDENTIFIER_RULE = "use 1-128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"

#: Audit log event names (``joined``, ``released``, ``signed_head``...).
AUDIT_EVENT_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

#: Audit log field names: lower-case words, so a line reads the same in every language.
AUDIT_FIELD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def is_identifier(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid job id or party name (text matching the rule)."""
    return isinstance(value, str) and IDENTIFIER_PATTERN.fullmatch(value) is not None
