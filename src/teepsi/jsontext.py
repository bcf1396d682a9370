"""Showing and reading user-supplied JSON safely: one-line values, strict parsing.

Shared by the policy (:mod:`teepsi.attestation.policy`) and the contract modules, so every
file a user hands us is parsed, and quoted back in errors, the same way.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from pathlib import Path


def show(value: object, limit: int = 40) -> str:
    """A short, single-line rendering of a user-supplied value for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value).replace("\n", "\\n")
        except (ValueError, RecursionError):  # nested too deeply, or an int too long
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Longest integer literal accepted in JSON input (Python refuses over 4300 by default).
MAX_INT_DIGITS = 64


def strict_json_loads(text: str, fail: Callable[[str], Exception]) -> object:
    """``json.loads`` that refuses duplicate keys and NaN/Infinity.

    ``fail`` turns a one-line problem into the caller's exception type.
    """

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # json keeps the last duplicate silently; a second value must not win unseen
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise fail(f"{one_line(key)}: duplicate key")
            out[key] = value
        return out

    def no_constant(name: str) -> object:
        raise fail(f"invalid JSON: {name} is not allowed")

    def bounded_int(digits: str) -> int:
        if len(digits) > MAX_INT_DIGITS:
            raise fail(f"invalid JSON: a number of {len(digits)} digits")
        return int(digits)

    try:
        return json.loads(
            text,
            object_pairs_hook=no_duplicates,
            parse_constant=no_constant,
            parse_int=bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise fail(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise fail("invalid JSON: nested too deeply") from None


def one_line(text: str, limit: int = 60) -> str:
    """``text`` itself when it is short and printable, else a quoted, shortened form."""
    return text if text.isprintable() and len(text) <= limit else show(text, limit)


def read_user_text(path: str | Path, fail: Callable[[str], Exception]) -> str:
    """A user's UTF-8 file (a BOM from Windows editors tolerated); one-line errors via ``fail``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start})") from None


def did_you_mean(key: str, allowed: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest allowed key, or ``""``: one wording everywhere."""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


#: Keys a user may add to any document as notes: ignored by every reader, one rule for all.
IGNORED_KEY_PREFIXES = ("_", "comment")


def is_ignored_key(key: str) -> bool:
    """A note key (``_...`` or ``comment...``) that readers of user documents skip."""
    return key.startswith(IGNORED_KEY_PREFIXES)
