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

This module holds the model, its whole-spec rules and its canonical form;
:mod:`teepsi.contract.spec_text` turns file text into a document and
:mod:`teepsi.contract.spec_fields` checks each field of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from teepsi.contract._common import canonical_json, is_int, show
from teepsi.contract.identifiers import IDENTIFIER_PATTERN, is_identifier
from teepsi.contract.normalization import Normalization, NormalizationError
from teepsi.contract.outputs import OutputKind
from teepsi.contract.party_keys import PartyKeyError, parse_public_key
from teepsi.contract.spec_fields import (
    SpecError,
    check_canonical_party_key,
    check_keys,
    check_reachable,
    fail,
    read_count,
    read_deadline,
    read_identifier,
    read_output,
)
from teepsi.contract.spec_text import (
    CANONICAL_SOURCE,
    MAX_SPEC_BYTES,
    parse_canonical_document,
    parse_document,
    read_spec_file,
)
from teepsi.timefmt import iso_utc

__all__ = [
    "CANONICAL_SOURCE",
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


@dataclass(frozen=True)
class PartySpec:
    name: str
    public_key: bytes  # SubjectPublicKeyInfo DER, canonical
    attest: bool = True

    def __post_init__(self) -> None:
        # Backstop for specs built in code; files are checked field by field when read.
        if not is_identifier(self.name):
            fail("PartySpec: name", f"{show(self.name)} is not a valid party name")
        if not isinstance(self.public_key, bytes):
            fail("PartySpec: public_key", "must be SubjectPublicKeyInfo DER bytes")
        check_canonical_party_key(self.public_key, "PartySpec: public_key")
        if not isinstance(self.attest, bool):
            fail("PartySpec: attest", "must be a bool")


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    parties: tuple[PartySpec, ...]
    recipients: tuple[str, ...]
    output: OutputKind = OutputKind.INTERSECTION
    min_intersection: int = 0
    max_items_per_party: int | None = None
    normalize: str = "trim"  # Normalization.canonical() form
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
        object.__setattr__(self, "output", read_output(self.output, "JobSpec: output"))
        object.__setattr__(self, "_by_name", {p.name: p for p in parties})
        self._check("JobSpec")

    def _check(self, source: str) -> None:
        """Whole-spec rules; field-level errors with file positions come from the reader."""
        if not is_identifier(self.job_id):
            fail(f"{source}: job_id", f"{show(self.job_id)} is not a valid job id")
        if not all(isinstance(p, PartySpec) for p in self.parties):
            fail(f"{source}: parties", "must be PartySpec values")
        if not MIN_PARTIES <= len(self.parties) <= MAX_PARTIES:
            fail(
                f"{source}: parties",
                f"{len(self.parties)} listed; a job needs {MIN_PARTIES} to {MAX_PARTIES}",
            )
        if len(self._by_name) != len(self.parties):
            fail(f"{source}: parties", "party names must be unique")
        if len({p.public_key for p in self.parties}) != len(self.parties):
            fail(f"{source}: parties", "every party needs its own public key")
        if not self.recipients:
            fail(f"{source}: recipients", "must name at least one party")
        if len(set(self.recipients)) != len(self.recipients):
            fail(f"{source}: recipients", "names a party twice")
        for name in self.recipients:
            if name not in self._by_name:
                fail(f"{source}: recipients", f"{show(name)} is not a party")
        read_count(self.min_intersection, f"{source}: min_intersection", minimum=0)
        if self.max_items_per_party is not None:
            read_count(self.max_items_per_party, f"{source}: max_items_per_party", minimum=1)
            check_reachable(self.min_intersection, self.max_items_per_party, source)
        if not isinstance(self.normalize, str):
            fail(f"{source}: normalize", "must be text")
        if _normalize(self.normalize, f"{source}: normalize") != self.normalize:
            fail(f"{source}: normalize", f"{show(self.normalize)} is not in canonical form")
        if self.deadline is not None:
            read_deadline(self.deadline, f"{source}: deadline")

    # --- reading -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        """Read a ``.toml`` or ``.json`` spec file."""
        data, fmt = read_spec_file(path)
        return cls.parse(data, source=str(path), fmt=fmt)

    @classmethod
    def parse(cls, data: bytes, *, source: str, fmt: str) -> JobSpec:
        """Parse spec text; ``fmt`` is ``"toml"`` or ``"json"``, ``source`` names it in errors."""
        return _read(parse_document(data, source=source, fmt=fmt), source, canonical=False)

    @classmethod
    def from_canonical(cls, data: bytes) -> JobSpec:
        """Parse :meth:`canonical_bytes` output; anything else, even re-formatted, fails."""
        raw, exact = parse_canonical_document(data)
        spec = _read(raw, CANONICAL_SOURCE, canonical=True)
        # One spec, one byte string: refuse any other spelling, so the digest a party
        # signed is the digest of exactly these bytes.
        if spec.canonical_bytes() != exact:
            raise SpecError(f"{CANONICAL_SOURCE}: not in canonical form")
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
        return None if self.deadline is None else iso_utc(self.deadline)


# --- reading a document ------------------------------------------------------------


def _normalize(value: object, where: str) -> str:
    if not isinstance(value, str):
        fail(where, f'expected text such as "trim,casefold", got {show(value)}')
    if not value.strip():
        fail(where, 'is empty: use e.g. "trim", "trim,casefold,nfc" or "none"')
    try:
        return Normalization.parse(value).canonical()
    except NormalizationError as exc:
        fail(where, str(exc))


def _read_party(raw: object, where: str, *, canonical: bool) -> PartySpec:
    if not isinstance(raw, dict):
        fail(where, "expected a table with name and public_key")
    check_keys(raw, _PARTY_KEYS, f"{where}.", canonical=canonical, misplaced=_TOP_KEYS)
    for key in ("name", "public_key"):
        if key not in raw:
            fail(f"{where}.{key}", "missing")
    name = read_identifier(raw["name"], f"{where}.name", "party name")
    key_where = f"{where}.public_key"
    text = raw["public_key"]
    if not isinstance(text, str):
        fail(key_where, f"expected text, got {show(text)}")
    if canonical:
        try:
            der = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            fail(key_where, "not valid base64")
        check_canonical_party_key(der, key_where)
    else:
        try:
            der = parse_public_key(text)
        except PartyKeyError as exc:
            fail(key_where, str(exc))
    attest = raw.get("attest", True)
    if not isinstance(attest, bool):
        fail(f"{where}.attest", f"expected true or false, got {show(attest)}")
    return PartySpec(name=name, public_key=der, attest=attest)


def _read(raw: object, source: str, *, canonical: bool) -> JobSpec:
    if not isinstance(raw, dict):
        fail(source, "expected a JSON object at the top level")
    check_keys(raw, _TOP_KEYS, f"{source}: ", canonical=canonical)

    def at(key: str) -> str:
        return f"{source}: {key}"

    version = raw.get("version", SPEC_VERSION)
    if not is_int(version) or version != SPEC_VERSION:
        fail(at("version"), f"unsupported spec version {show(version)}: this teepsi reads 1")
    if "job_id" not in raw:
        fail(at("job_id"), "missing")
    job_id = read_identifier(raw["job_id"], at("job_id"), "job id")
    output = read_output(raw.get("output", OutputKind.INTERSECTION.value), at("output"))
    min_intersection = read_count(raw.get("min_intersection", 0), at("min_intersection"), minimum=0)
    max_items: int | None = None
    if raw.get("max_items_per_party") is not None:  # JSON null means "no limit"
        max_items = read_count(raw["max_items_per_party"], at("max_items_per_party"), minimum=1)
        check_reachable(min_intersection, max_items, source)
    normalize = _normalize(raw.get("normalize", "trim"), at("normalize"))
    deadline: int | None = None
    if raw.get("deadline") is not None:
        deadline = read_deadline(raw["deadline"], at("deadline"))

    if "parties" not in raw:
        fail(at("parties"), "missing: list every party with its name and public key")
    raw_parties = raw["parties"]
    if not isinstance(raw_parties, list):
        fail(at("parties"), "expected a list of parties ([[parties]] tables in TOML)")
    if not MIN_PARTIES <= len(raw_parties) <= MAX_PARTIES:
        fail(
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
            fail(
                f"{where}.name",
                f"duplicate party name {show(party.name)} (also parties[{seen_names[party.name]}])",
            )
        if party.public_key in seen_keys:
            fail(
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
            fail(at("recipients"), f"expected a list of party names, got {show(raw_recipients)}")
        if not raw_recipients:
            fail(at("recipients"), "is empty: name at least one party (omit it for all)")
        recipients = []
        for index, name in enumerate(raw_recipients):
            where = f"{source}: recipients[{index}]"
            if not isinstance(name, str):
                fail(where, f"expected a party name, got {show(name)}")
            if name not in seen_names:
                fail(where, f"{show(name)} is not a party of this job")
            if name in recipients:
                fail(where, f"{show(name)} is listed twice")
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
