"""The job spec: the contract every party of a job agrees to, byte for byte.

One file, TOML (``.toml``) or JSON (``.json``)::

    job_id = "q4-customer-overlap"
    output = "intersection"            # or "count"
    min_intersection = 100             # default 0
    max_items_per_party = 10000000     # optional
    normalize = "trim,casefold"        # default "trim"
    deadline = "2026-12-31T23:00:00Z"  # optional; RFC 3339 UTC, or integer UNIX seconds
    recipients = ["bank-a", "bank-b"]  # default: every party

    [[parties]]
    name = "bank-a"
    public_key = "ed25519:MCowBQYDK2VwAyEA..."
    attest = true                      # default true

Parties agree on the spec's :meth:`JobSpec.digest`, SHA-256 of its canonical bytes, so
what matters is the meaning, not the spelling: TOML or JSON, keys in any order, parties
and recipients in any order (both are sets, kept sorted by name), an Ed25519 key as
``ed25519:`` or PEM, ``recipients`` omitted or listing everyone, a deadline as text or
as a number: all give the same digest.

Reading fails closed, with one-line messages ``<file>: <field>: <problem>``: unknown
keys are errors (keys starting with ``_`` or ``comment`` are ignored, for notes), types
are strict (``true`` is not ``1``, ``1.0`` is not an integer), and the spec must make
sense as a whole (2-256 parties with distinct names and keys, recipients among them, a
threshold the upload limit can reach). Whether the deadline has passed is the server's
business, not the parser's: an expired spec is still a well-formed one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import difflib
import hashlib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from teepsi.contract._common import (
    IDENTIFIER_PATTERN,
    MAX_COUNT,
    canonical_json,
    is_identifier,
    is_int,
    one_line,
    show,
    strict_json_loads,
)
from teepsi.contract.keys import PartyKeyError, canonical_public_key_der, parse_public_key
from teepsi.contract.normalization import Normalization, NormalizationError

__all__ = [
    "IDENTIFIER_PATTERN",
    "MAX_PARTIES",
    "MAX_SPEC_BYTES",
    "MIN_PARTIES",
    "SPEC_VERSION",
    "JobSpec",
    "OutputKind",
    "PartySpec",
    "SpecError",
]

SPEC_VERSION = 1
MIN_PARTIES = 2
MAX_PARTIES = 256
#: A spec of 256 parties with PEM keys is about 100 KiB; the cap bounds what a Join
#: message can make the server parse.
MAX_SPEC_BYTES = 1024 * 1024
#: Source name of specs parsed from canonical bytes (what travels in a Join).
CANONICAL_SOURCE = "job spec"

_MAX_DEADLINE = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can show
_RFC3339_UTC = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[Zz]|\+00:00)")

_TOP_KEYS = (
    "version",
    "job_id",
    "output",
    "min_intersection",
    "max_items_per_party",
    "normalize",
    "deadline",
    "recipients",
    "parties",
)
_PARTY_KEYS = ("name", "public_key", "attest")


class SpecError(ValueError):
    """The spec is unreadable or invalid; the message is one line naming file and field."""


class OutputKind(StrEnum):
    INTERSECTION = "intersection"
    COUNT = "count"


def _fail(where: str, problem: str) -> NoReturn:
    raise SpecError(f"{where}: {problem}")


def _check_canonical_party_key(der: bytes, where: str) -> None:
    try:
        canonical = canonical_public_key_der(der)
    except PartyKeyError as exc:
        _fail(where, str(exc))
    if canonical != der:
        _fail(where, "public key is not in canonical SubjectPublicKeyInfo DER form")


@dataclass(frozen=True)
class PartySpec:
    name: str
    public_key: bytes  # SubjectPublicKeyInfo DER, canonical
    attest: bool = True

    def __post_init__(self) -> None:
        # Backstop for specs built in code; files are checked field by field when read.
        if not is_identifier(self.name):
            _fail("PartySpec: name", f"{show(self.name)} is not a valid party name")
        if not isinstance(self.public_key, bytes):
            _fail("PartySpec: public_key", "must be SubjectPublicKeyInfo DER bytes")
        _check_canonical_party_key(self.public_key, "PartySpec: public_key")
        if not isinstance(self.attest, bool):
            _fail("PartySpec: attest", "must be a bool")


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    parties: tuple[PartySpec, ...]
    recipients: tuple[str, ...]
    output: OutputKind = OutputKind.INTERSECTION
    min_intersection: int = 0
    max_items_per_party: int | None = None
    normalize: str = "trim"  # canonical Normalization.canonical() form
    deadline: int | None = None  # UNIX seconds
    _by_name: dict[str, PartySpec] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        # Parties and recipients are sets: keep them sorted so that equal specs compare
        # equal and serialise identically, however they were listed.
        parties = tuple(sorted(self.parties, key=lambda p: p.name))
        recipients = tuple(sorted(self.recipients))
        object.__setattr__(self, "parties", parties)
        object.__setattr__(self, "recipients", recipients)
        object.__setattr__(self, "output", _output(self.output, "JobSpec: output"))
        object.__setattr__(self, "_by_name", {p.name: p for p in parties})
        self._check("JobSpec")

    def _check(self, source: str) -> None:
        """Whole-spec rules; field-level errors with file positions come from the reader."""
        if not is_identifier(self.job_id):
            _fail(f"{source}: job_id", f"{show(self.job_id)} is not a valid job id")
        if not all(isinstance(p, PartySpec) for p in self.parties):
            _fail(f"{source}: parties", "must be PartySpec values")
        if not MIN_PARTIES <= len(self.parties) <= MAX_PARTIES:
            _fail(
                f"{source}: parties",
                f"{len(self.parties)} listed; a job needs {MIN_PARTIES} to {MAX_PARTIES}",
            )
        if len(self._by_name) != len(self.parties):
            _fail(f"{source}: parties", "party names must be unique")
        if len({p.public_key for p in self.parties}) != len(self.parties):
            _fail(f"{source}: parties", "every party needs its own public key")
        if not self.recipients:
            _fail(f"{source}: recipients", "must name at least one party")
        if len(set(self.recipients)) != len(self.recipients):
            _fail(f"{source}: recipients", "names a party twice")
        for name in self.recipients:
            if name not in self._by_name:
                _fail(f"{source}: recipients", f"{show(name)} is not a party")
        _count(self.min_intersection, f"{source}: min_intersection", minimum=0)
        if self.max_items_per_party is not None:
            _count(self.max_items_per_party, f"{source}: max_items_per_party", minimum=1)
            _check_reachable(self.min_intersection, self.max_items_per_party, source)
        if not isinstance(self.normalize, str):
            _fail(f"{source}: normalize", "must be text")
        if _normalize(self.normalize, f"{source}: normalize") != self.normalize:
            _fail(f"{source}: normalize", f"{show(self.normalize)} is not in canonical form")
        if self.deadline is not None:
            _deadline_seconds(self.deadline, f"{source}: deadline")

    # --- reading -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        """Read a ``.toml`` or ``.json`` spec file."""
        where = str(path)
        suffix = Path(path).suffix.lower()
        if suffix not in (".toml", ".json"):
            raise SpecError(f"{where}: expected a .toml or .json file")
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"{where}: cannot read: {exc.strerror or exc}") from None
        return cls.parse(data, source=where, fmt=suffix[1:])

    @classmethod
    def parse(cls, data: bytes, *, source: str, fmt: str) -> JobSpec:
        """Parse spec text; ``fmt`` is ``"toml"`` or ``"json"``, ``source`` names it in errors."""
        if fmt not in ("toml", "json"):
            raise SpecError(f"{source}: unknown spec format {show(fmt)}: use toml or json")
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES} bytes")
        try:
            text = bytes(data).decode("utf-8-sig")  # tolerate a BOM from Windows editors
        except UnicodeDecodeError as exc:
            raise SpecError(f"{source}: not UTF-8 text (byte {exc.start})") from None
        raw: object
        if fmt == "toml":
            _check_dotted_keys(text, source)
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise SpecError(f"{source}: invalid TOML: {_first_line(exc)}") from None
            except RecursionError:
                raise SpecError(f"{source}: invalid TOML: nested too deeply") from None
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise SpecError(f"{source}: invalid TOML: {_first_line(exc)}") from None
        else:
            raw = strict_json_loads(text, lambda problem: SpecError(f"{source}: {problem}"))
        return _read(raw, source, canonical=False)

    @classmethod
    def from_canonical(cls, data: bytes) -> JobSpec:
        """Parse :meth:`canonical_bytes` output; anything else, even re-formatted, fails."""
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
        raw = strict_json_loads(text, lambda problem: SpecError(f"{source}: {problem}"))
        spec = _read(raw, source, canonical=True)
        # One spec, one byte string: refuse any other spelling, so the digest a party
        # signed is the digest of exactly these bytes.
        if spec.canonical_bytes() != data:
            raise SpecError(f"{source}: not in canonical form")
        return spec

    # --- writing and queries -----------------------------------------------------------

    def to_canonical_dict(self) -> dict[str, object]:
        return {
            "version": SPEC_VERSION,
            "job_id": self.job_id,
            "output": self.output.value,
            "min_intersection": self.min_intersection,
            "max_items_per_party": self.max_items_per_party,
            "normalize": self.normalize,
            "deadline": self.deadline,
            "recipients": list(self.recipients),
            "parties": [
                {
                    "name": p.name,
                    "public_key": base64.b64encode(p.public_key).decode("ascii"),
                    "attest": p.attest,
                }
                for p in self.parties
            ],
        }

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON: sorted keys, no whitespace, ASCII; keys as base64 SPKI DER."""
        return canonical_json(self.to_canonical_dict())

    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical_bytes`: what parties compare to agree."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    def party(self, name: str) -> PartySpec | None:
        return self._by_name.get(name)

    def is_recipient(self, name: str) -> bool:
        return name in self.recipients

    def deadline_text(self) -> str | None:
        """The deadline as RFC 3339 UTC text, for messages."""
        if self.deadline is None:
            return None
        return dt.datetime.fromtimestamp(self.deadline, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- field readers ---------------------------------------------------------------------


#: Dotted parts allowed in one TOML line: tomllib parses keys of thousands of parts in
#: quadratic time, so such input is refused before it gets there.
_MAX_DOTS_PER_LINE = 64
_TOML_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'')


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


def _is_ignored_key(key: str) -> bool:
    return key.startswith(("_", "comment"))


def _check_keys(
    obj: dict[object, object],
    allowed: Sequence[str],
    prefix: str,
    *,
    canonical: bool,
    misplaced: Sequence[str] = (),
) -> None:
    for key in obj:
        if not isinstance(key, str):
            _fail(f"{prefix}{show(key)}", "keys must be strings")
        if key in allowed or (_is_ignored_key(key) and not canonical):
            continue
        if key in misplaced:
            # TOML puts every key after [[parties]] into that party's table.
            _fail(
                f"{prefix}{key}",
                "unknown key in a party (in TOML, top-level keys must come before the "
                "first [[parties]])",
            )
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        _fail(
            f"{prefix}{one_line(key)}",
            f'unknown key{suggestion}; keys starting with "_" or "comment" are ignored',
        )


def _identifier(value: object, where: str, what: str) -> str:
    if is_identifier(value):
        assert isinstance(value, str)
        return value
    if not isinstance(value, str):
        _fail(where, f"expected text, got {show(value)}")
    _fail(
        where,
        f"{show(value)} is not a valid {what}: use 1-128 letters, digits, '.', '_', '@' "
        "or '-', starting with a letter or digit",
    )


def _count(value: object, where: str, *, minimum: int) -> int:
    if is_int(value):
        assert isinstance(value, int)
        if minimum <= value <= MAX_COUNT:
            return value
        _fail(where, f"must be between {minimum} and {MAX_COUNT}, got {show(value)}")
    _fail(where, f"expected an integer, got {show(value)}")


def _check_reachable(min_intersection: int, max_items: int, source: str) -> None:
    if min_intersection > max_items:
        _fail(
            f"{source}: min_intersection",
            f"{min_intersection} exceeds max_items_per_party {max_items}: "
            "the result could never be released",
        )


def _output(value: object, where: str) -> OutputKind:
    if isinstance(value, str):
        try:
            return OutputKind(value)
        except ValueError:
            pass
    _fail(where, f'expected "intersection" or "count", got {show(value)}')


def _normalize(value: object, where: str) -> str:
    if not isinstance(value, str):
        _fail(where, f'expected text such as "trim,casefold", got {show(value)}')
    if not value.strip():
        _fail(where, 'is empty: use e.g. "trim", "trim,casefold,nfc" or "none"')
    try:
        return Normalization.parse(value).canonical()
    except NormalizationError as exc:
        _fail(where, str(exc))


def _deadline_seconds(value: object, where: str) -> int:
    """Integer UNIX seconds from an integer, RFC 3339 UTC text, or a TOML date-time."""
    if is_int(value):
        assert isinstance(value, int)
        if 1 <= value <= _MAX_DEADLINE:
            return value
        _fail(where, f"UNIX seconds must be between 1 and {_MAX_DEADLINE}, got {show(value)}")
    moment: dt.datetime
    if isinstance(value, str):
        match = _RFC3339_UTC.fullmatch(value)
        if match is None:
            _fail(
                where,
                f"{show(value)} is not an RFC 3339 UTC time such as "
                '"2026-12-31T23:00:00Z" (whole seconds, offset Z or +00:00)',
            )
        try:
            year, month, day, hour, minute, second = (int(g) for g in match.groups())
            moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
        except ValueError as exc:
            _fail(where, f"{show(value)} is not a valid time: {exc}")
    elif isinstance(value, dt.datetime):  # TOML's native offset date-time
        offset = value.utcoffset()
        if offset is None:
            _fail(where, "a TOML local date-time has no time zone: add Z (UTC)")
        if offset != dt.timedelta(0):
            _fail(where, "must be in UTC (offset Z or +00:00)")
        if value.microsecond:
            _fail(where, "must be whole seconds")
        moment = value
    else:
        _fail(where, f"expected RFC 3339 UTC text or integer UNIX seconds, got {show(value)}")
    seconds = int(moment.timestamp())
    if seconds < 1:
        _fail(where, "must be after 1970-01-01T00:00:00Z")
    return seconds


def _read_party(raw: object, where: str, *, canonical: bool) -> PartySpec:
    if not isinstance(raw, dict):
        _fail(where, "expected a table with name and public_key")
    _check_keys(raw, _PARTY_KEYS, f"{where}.", canonical=canonical, misplaced=_TOP_KEYS)
    for key in ("name", "public_key"):
        if key not in raw:
            _fail(f"{where}.{key}", "missing")
    name = _identifier(raw["name"], f"{where}.name", "party name")
    key_where = f"{where}.public_key"
    text = raw["public_key"]
    if not isinstance(text, str):
        _fail(key_where, f"expected text, got {show(text)}")
    if canonical:
        try:
            der = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            _fail(key_where, "not valid base64")
        _check_canonical_party_key(der, key_where)
    else:
        try:
            der = parse_public_key(text)
        except PartyKeyError as exc:
            _fail(key_where, str(exc))
    attest = raw.get("attest", True)
    if not isinstance(attest, bool):
        _fail(f"{where}.attest", f"expected true or false, got {show(attest)}")
    return PartySpec(name=name, public_key=der, attest=attest)


def _read(raw: object, source: str, *, canonical: bool) -> JobSpec:
    if not isinstance(raw, dict):
        _fail(source, "expected a JSON object at the top level")
    _check_keys(raw, _TOP_KEYS, f"{source}: ", canonical=canonical)

    def at(key: str) -> str:
        return f"{source}: {key}"

    version = raw.get("version", SPEC_VERSION)
    if not is_int(version) or version != SPEC_VERSION:
        _fail(at("version"), f"unsupported spec version {show(version)}: this teepsi reads 1")
    if "job_id" not in raw:
        _fail(at("job_id"), "missing")
    job_id = _identifier(raw["job_id"], at("job_id"), "job id")
    output = _output(raw.get("output", OutputKind.INTERSECTION.value), at("output"))
    min_intersection = _count(raw.get("min_intersection", 0), at("min_intersection"), minimum=0)
    max_items: int | None = None
    if raw.get("max_items_per_party") is not None:  # JSON null means "no limit"
        max_items = _count(raw["max_items_per_party"], at("max_items_per_party"), minimum=1)
        _check_reachable(min_intersection, max_items, source)
    normalize = _normalize(raw.get("normalize", "trim"), at("normalize"))
    deadline: int | None = None
    if raw.get("deadline") is not None:
        deadline = _deadline_seconds(raw["deadline"], at("deadline"))

    if "parties" not in raw:
        _fail(at("parties"), "missing: list every party with its name and public key")
    raw_parties = raw["parties"]
    if not isinstance(raw_parties, list):
        _fail(at("parties"), "expected a list of parties ([[parties]] tables in TOML)")
    if not MIN_PARTIES <= len(raw_parties) <= MAX_PARTIES:
        _fail(
            at("parties"),
            f"{len(raw_parties)} listed; a job needs {MIN_PARTIES} to {MAX_PARTIES} parties",
        )
    parties: list[PartySpec] = []
    seen_names: dict[str, int] = {}
    seen_keys: dict[bytes, int] = {}
    for index, item in enumerate(raw_parties):
        where = f"{source}: parties[{index}]"
        party = _read_party(item, where, canonical=canonical)
        if party.name in seen_names:
            _fail(
                f"{where}.name",
                f"duplicate party name {show(party.name)} (also parties[{seen_names[party.name]}])",
            )
        if party.public_key in seen_keys:
            _fail(
                f"{where}.public_key",
                f"same key as parties[{seen_keys[party.public_key]}]: "
                "every party needs its own key",
            )
        seen_names[party.name] = index
        seen_keys[party.public_key] = index
        parties.append(party)

    recipients: list[str]
    if "recipients" in raw:
        raw_recipients = raw["recipients"]
        if not isinstance(raw_recipients, list):
            _fail(at("recipients"), f"expected a list of party names, got {show(raw_recipients)}")
        if not raw_recipients:
            _fail(at("recipients"), "is empty: name at least one party (omit it for all)")
        recipients = []
        for index, name in enumerate(raw_recipients):
            where = f"{source}: recipients[{index}]"
            if not isinstance(name, str):
                _fail(where, f"expected a party name, got {show(name)}")
            if name not in seen_names:
                _fail(where, f"{show(name)} is not a party of this job")
            if name in recipients:
                _fail(where, f"{show(name)} is listed twice")
            recipients.append(name)
    else:
        recipients = list(seen_names)

    spec = JobSpec(
        job_id=job_id,
        parties=tuple(parties),
        recipients=tuple(recipients),
        output=output,
        min_intersection=min_intersection,
        max_items_per_party=max_items,
        normalize=normalize,
        deadline=deadline,
    )
    return spec
