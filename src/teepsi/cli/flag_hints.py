"""The command line's names for what library messages call by their own terms.

The library's errors and log lines name a setting as its API does (a config field such
as ``allow_simulated``, or the thing: "the server address"); a ``teepsi`` user needs the
flag that sets it. :func:`with_flag_hints` rewrites a message into the command line's
words, for every error the CLI prints and (:class:`FlagHintFilter`) every log record.
"""

from __future__ import annotations

import logging
import re

#: Library term -> the command line's words for it. The terms are ones the library uses
#: for settings only, so that a rewrite never changes a message about something else.
FLAG_HINTS: dict[str, str] = {
    # teepsi.protocol.connect, teepsi.client (PartyConfig.host)
    "the server address": "--host",
    # teepsi.engine (TableSpec and the tables' writers and readers)
    "the output path": "--output",
    "set the table format to": "pass --format",
    "the table format": "--format",
    "the data path": "the --data path",
    "the memory budget": "--memory-budget",
    # teepsi.client (PartyConfig's fields); a switch is "set" in the library, "passed" here
    "set allow_simulated": "pass --allow-simulated",
    # teepsi.server: "start its parties with attestation 'sim' and allow_simulated"
    "and allow_simulated": "--allow-simulated",
    "allow_simulated": "--allow-simulated",
    "set insecure_pccs_tls": "pass --insecure-pccs-tls",
    # Not "pccs_url" alone: the QCNL file has a key of that name, which its errors name.
    "set pccs_url": "set --pccs-url",
    "a PCCS (pccs_url)": "a PCCS (--pccs-url)",
    "collateral_state": "--collateral-state",
    "party_count": "--parties",
    "party_key": "--key-file",
    "resume_token": "--resume-file",
    "resuming in quick mode": "--resume in quick mode",
    "without resuming": "without --resume",
    "this party's timeout of": "--timeout",
    # teepsi.server (ServerConfig's fields and its Limits)
    "client_policy, a dynamic_config.json": "--config dynamic_config.json",
    "require_client_attestation off": "--no-client-attestation",
    "max_connections": "--max-connections",
    "drain_seconds": "--drain-seconds",
    "certificate_lifetime": "--certificate-lifetime",
    "job_timeout_seconds": "--job-timeout",
    "their own (pccs_url)": "their own (--pccs-url)",
    "audit_log": "--audit-log",
    "metrics_host": "--metrics-host",
    "metrics_public": "--metrics-public",
}

# Longest term first, so that "set allow_simulated" wins over "allow_simulated"; a term
# matches whole words only (never "party_count" inside "max_party_count").
_TERMS = re.compile(
    "|".join(rf"(?<![\w-]){re.escape(term)}(?![\w-])" for term in sorted(FLAG_HINTS, key=len)[::-1])
)


#: A setting named with its value, "attestation 'sim'" (PartyConfig/ServerConfig.attestation,
#: in teepsi.attestation.tdx, teepsi.client and teepsi.server): the flag and the value.
_VALUED = re.compile(r"(?<![\w-])attestation '(gramine|tdx|sim|none)'")


def with_flag_hints(message: str) -> str:
    """``message`` with each library term for a setting replaced by its flag."""
    message = _VALUED.sub(r"--attestation \1", message)
    return _TERMS.sub(lambda match: FLAG_HINTS[match.group(0)], message)


class FlagHintFilter(logging.Filter):
    """Rewrites each record's message with :func:`with_flag_hints` (on a log handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hinted = with_flag_hints(message)
        if hinted != message:
            record.msg, record.args = hinted, None
        return True
