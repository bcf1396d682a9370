"""Reading a job spec's text: a ``.toml`` or ``.json`` file, or the canonical bytes.

This turns bytes into a raw document (dicts, lists, scalars) and nothing more; what the
document must hold is checked by :mod:`teepsi.contract.spec`. Input is bounded before
any parser sees it: at most :data:`MAX_SPEC_BYTES`, UTF-8 (a BOM tolerated), no TOML
line of thousands of dotted key parts, and JSON without duplicate keys or NaN.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from teepsi.contract._common import show, strict_json_loads
from teepsi.contract.spec_fields import SpecError

__all__ = [
    "CANONICAL_SOURCE",
    "MAX_SPEC_BYTES",
    "SPEC_FORMATS",
    "parse_canonical_document",
    "parse_document",
    "read_spec_file",
]

#: A spec of 256 parties with PEM keys is about 100 KiB; the cap bounds what a Join
#: message can make the server parse.
MAX_SPEC_BYTES = 1024 * 1024
#: Source name of specs parsed from canonical bytes (what travels in a Join).
CANONICAL_SOURCE = "job spec"
#: The formats a spec file can be written in, named by its suffix.
SPEC_FORMATS = ("toml", "json")

#: Dotted parts allowed in one TOML line: tomllib parses keys of thousands of parts in
#: quadratic time, so such input is refused before it gets there.
_MAX_DOTS_PER_LINE = 64
_TOML_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'')


def read_spec_file(path: str | Path) -> tuple[bytes, str]:
    """A spec file's bytes (at most one more than the cap) and its format."""
    where = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SpecError(f"{where}: expected a .toml or .json file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{where}: cannot read: {exc.strerror or exc}") from None
    return data, suffix[1:]


def parse_document(data: bytes, *, source: str, fmt: str) -> object:
    """Spec text as a raw document; ``fmt`` is ``"toml"`` or ``"json"``."""
    if fmt not in SPEC_FORMATS:
        raise SpecError(f"{source}: unknown spec format {show(fmt)}: use toml or json")
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    if fmt == "json":
        return strict_json_loads(text, lambda problem: SpecError(f"{source}: {problem}"))
    _check_dotted_keys(text, source)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: invalid TOML: {_first_line(exc)}") from None
    except RecursionError:
        raise SpecError(f"{source}: invalid TOML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{source}: invalid TOML: {_first_line(exc)}") from None


def parse_canonical_document(data: object) -> tuple[object, bytes]:
    """Canonical spec bytes as a raw document, and the bytes (to compare after reading)."""
    source = CANONICAL_SOURCE
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SpecError(f"{source}: expected bytes")
    data = bytes(data)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = data.decode("ascii")  # canonical JSON escapes everything else
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source}: not canonical JSON (non-ASCII byte {exc.start})") from None
    return strict_json_loads(text, lambda problem: SpecError(f"{source}: {problem}")), data


def _check_dotted_keys(text: str, source: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.count(".") > _MAX_DOTS_PER_LINE:
            bare = _TOML_STRINGS.sub("", line)
            if bare.count(".") > _MAX_DOTS_PER_LINE:
                raise SpecError(
                    f"{source}: line {number}: more than {_MAX_DOTS_PER_LINE} dotted key parts"
                )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
