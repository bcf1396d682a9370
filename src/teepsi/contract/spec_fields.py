"""Checking a job spec's fields one by one: types, ranges, names, times and unknown keys.

Every check raises :class:`SpecError` with one line ``<where>: <problem>``, where
``where`` names the file and the field (``job.toml: parties[1].name``), so a user can
go straight to the line to fix. Types are strict: ``true`` is not ``1``, ``1.0`` is not
an integer.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import NoReturn

from teepsi.contract._common import MAX_COUNT, is_int, one_line, show
from teepsi.contract.identifiers import IDENTIFIER_RULE, is_identifier
from teepsi.contract.outputs import OutputKind
from teepsi.contract.party_keys import PartyKeyError, canonical_public_key_der
from teepsi.errors import TeepsiError
from teepsi.jsontext import did_you_mean, is_ignored_key

__all__ = [
    "SpecError",
    "check_canonical_party_key",
    "check_keys",
    "check_reachable",
    "fail",
    "read_count",
    "read_deadline",
    "read_identifier",
    "read_output",
]

_MAX_DEADLINE = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can show
_RFC3339_UTC = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[Zz]|\+00:00)")


class SpecError(TeepsiError, ValueError):
    """The spec is unreadable or invalid; the message is one line naming file and field."""


def fail(where: str, problem: str) -> NoReturn:
    raise SpecError(f"{where}: {problem}")


def check_canonical_party_key(der: bytes, where: str) -> None:
    """``der`` must be an accepted party key, already in canonical SPKI DER form."""
    try:
        canonical = canonical_public_key_der(der)
    except PartyKeyError as exc:
        fail(where, str(exc))
    if canonical != der:
        fail(where, "public key is not in canonical SubjectPublicKeyInfo DER form")


def check_keys(
    obj: dict[object, object],
    allowed: Sequence[str],
    prefix: str,
    *,
    canonical: bool,
    misplaced: Sequence[str] = (),
) -> None:
    """Refuse keys outside ``allowed`` (notes starting with ``_`` or ``comment`` pass,
    except in canonical form); ``misplaced`` are keys of the enclosing table."""
    for key in obj:
        if not isinstance(key, str):
            fail(f"{prefix}{show(key)}", "keys must be strings")
        if key in allowed or (is_ignored_key(key) and not canonical):
            continue
        if key in misplaced:
            # TOML puts every key after [[parties]] into that party's table.
            fail(
                f"{prefix}{key}",
                "unknown key in a party (in TOML, top-level keys must come before the "
                "first [[parties]])",
            )
        fail(
            f"{prefix}{one_line(key)}",
            f"unknown key{did_you_mean(key, allowed)}; "
            'keys starting with "_" or "comment" are ignored',
        )


def read_identifier(value: object, where: str, what: str) -> str:
    """A job id or party name (``what`` says which, in the message)."""
    if is_identifier(value):
        assert isinstance(value, str)
        return value
    if not isinstance(value, str):
        fail(where, f"expected text, got {show(value)}")
    fail(where, f"{show(value)} is not a valid {what}: {IDENTIFIER_RULE}")


def read_count(value: object, where: str, *, minimum: int) -> int:
    """An integer from ``minimum`` to :data:`MAX_COUNT`."""
    if is_int(value):
        assert isinstance(value, int)
        if minimum <= value <= MAX_COUNT:
            return value
        fail(where, f"must be between {minimum} and {MAX_COUNT}, got {show(value)}")
    fail(where, f"expected an integer, got {show(value)}")


def check_reachable(min_intersection: int, max_items: int, source: str) -> None:
    """A threshold above the upload limit could never be met: refuse the spec."""
    if min_intersection > max_items:
        fail(
            f"{source}: min_intersection",
            f"{min_intersection} exceeds max_items_per_party {max_items}: "
            "the result could never be released",
        )


def read_output(value: object, where: str) -> OutputKind:
    if isinstance(value, str):
        try:
            return OutputKind(value)
        except ValueError:
            pass
    kinds = " or ".join(f'"{kind.value}"' for kind in OutputKind)
    fail(where, f"expected {kinds}, got {show(value)}")


def read_deadline(value: object, where: str) -> int:
    """Integer UNIX seconds from an integer, RFC 3339 UTC text, or a TOML date-time."""
    if is_int(value):
        assert isinstance(value, int)
        if 1 <= value <= _MAX_DEADLINE:
            return value
        fail(where, f"UNIX seconds must be between 1 and {_MAX_DEADLINE}, got {show(value)}")
    moment: dt.datetime
    if isinstance(value, str):
        match = _RFC3339_UTC.fullmatch(value)
        if match is None:
            fail(
                where,
                f"{show(value)} is not an RFC 3339 UTC time such as "
                '"2026-12-31T23:00:00Z" (whole seconds, offset Z or +00:00)',
            )
        try:
            year, month, day, hour, minute, second = (int(g) for g in match.groups())
            moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
        except ValueError as exc:
            fail(where, f"{show(value)} is not a valid time: {exc}")
    elif isinstance(value, dt.datetime):  # TOML's native offset date-time
        offset = value.utcoffset()
        if offset is None:
            fail(where, "a TOML local date-time has no time zone: add Z (UTC)")
        if offset != dt.timedelta(0):
            fail(where, "must be in UTC (offset Z or +00:00)")
        if value.microsecond:
            fail(where, "must be whole seconds")
        moment = value
    else:
        fail(where, f"expected RFC 3339 UTC text or integer UNIX seconds, got {show(value)}")
    seconds = int(moment.timestamp())
    if seconds < 1:
        fail(where, "must be after 1970-01-01T00:00:00Z")
    return seconds
