"""Log lines for people (text) and for log shippers (JSON), both stamped in UTC.

Text: ``2026-12-01T09:02:02.123Z teepsi server: INFO message``. JSON: one object per line
with the stable fields ``ts``, ``level``, ``logger``, ``msg``, ``role``, and any structured
fields the call passed with ``extra=`` (and ``exc`` for an exception's one line). Logs are
public (docs/threat-model.md): what they may hold is decided where a line is written; the
format adds nothing but the time, level, logger name and role.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def utc_timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: sorts as text, parses everywhere."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with ``extra=``."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s teepsi {role}: %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return utc_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "role": self._role,
        }
        for key, value in structured_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            # One line: the exception's type and text, never a traceback.
            error = record.exc_info[1]
            entry["exc"] = f"{type(error).__name__}: {error}"
        return json.dumps(entry, default=str, ensure_ascii=False)


def json_log_line(
    role: str, message: str, level: int = logging.ERROR, logger: str = "teepsi", **fields: Any
) -> str:
    """One JSON log line (no newline) for a message written before or without logging set
    up, exactly as :class:`JsonFormatter` writes a logged one."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    record.__dict__.update(fields)
    return JsonFormatter(role).format(record)


def setup_logging(
    role: str, level: int, log_format: str = "text", stream: TextIO | None = None
) -> None:
    """Send every log record to ``stream`` (stderr) in ``log_format``, at ``level``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(TextFormatter(role) if log_format == "text" else JsonFormatter(role))
    logging.basicConfig(level=level, handlers=[handler], force=True)
