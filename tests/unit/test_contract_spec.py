"""Job specs: one digest per meaning, and a one-line error for every way to get one wrong."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from teepsi.contract.party_keys import generate_private_key, public_key_der, public_key_text
from teepsi.contract.spec import JobSpec, OutputKind, PartySpec, SpecError

KEY_A = generate_private_key()
KEY_B = ec.generate_private_key(ec.SECP256R1())
KEY_C = generate_private_key()
DER_A, DER_B, DER_C = (public_key_der(k) for k in (KEY_A, KEY_B, KEY_C))
TEXT_A, TEXT_B, TEXT_C = (public_key_text(d) for d in (DER_A, DER_B, DER_C))
# The same Ed25519 key A as a PEM block instead of the ed25519: form.
PEM_A = (
    KEY_A.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid TOML basic string


TOML = f"""
# the spec of the README
job_id = "q4-customer-overlap"
output = "intersection"
min_intersection = 100
max_items_per_party = 10000000
normalize = "trim,casefold"
deadline = "2026-12-31T23:00:00Z"
recipients = ["bank-a", "bank-b"]

[[parties]]
name = "bank-a"
public_key = {toml_string(TEXT_A)}
attest = true

[[parties]]
name = "bank-b"
public_key = {toml_string(TEXT_B)}
attest = false

[[parties]]
name = "insurer-c"
public_key = {toml_string(TEXT_C)}
"""


def base() -> dict[str, Any]:
    """The JSON equivalent of TOML, keys in another order, parties reversed."""
    return {
        "parties": [
            {"public_key": TEXT_C, "name": "insurer-c"},
            {"attest": False, "name": "bank-b", "public_key": TEXT_B},
            {"name": "bank-a", "public_key": PEM_A, "attest": True},
        ],
        "recipients": ["bank-b", "bank-a"],
        "deadline": 1798758000,
        "normalize": "casefold , trim",
        "max_items_per_party": 10_000_000,
        "min_intersection": 100,
        "output": "intersection",
        "job_id": "q4-customer-overlap",
    }


def parse_json(data: dict[str, Any], source: str = "job.json") -> JobSpec:
    return JobSpec.parse(json.dumps(data).encode(), source=source, fmt="json")


def test_toml_and_json_spellings_give_one_digest(tmp_path: Path) -> None:
    toml_path = tmp_path / "job.toml"
    toml_path.write_text(TOML)
    json_path = tmp_path / "job.json"
    json_path.write_text(json.dumps(base(), indent=4))
    from_toml = JobSpec.load(toml_path)
    from_json = JobSpec.load(json_path)
    assert from_toml == from_json
    assert from_toml.canonical_bytes() == from_json.canonical_bytes()
    assert from_toml.digest() == from_json.digest()
    assert from_toml.digest() == hashlib.sha256(from_toml.canonical_bytes()).digest()

    spec = from_toml
    assert spec.job_id == "q4-customer-overlap"
    assert spec.output is OutputKind.INTERSECTION
    assert spec.min_intersection == 100
    assert spec.max_items_per_party == 10_000_000
    assert spec.normalize == "trim,casefold"
    assert spec.deadline == 1798758000
    assert spec.deadline_text() == "2026-12-31T23:00:00Z"
    assert [p.name for p in spec.parties] == ["bank-a", "bank-b", "insurer-c"]
    assert spec.recipients == ("bank-a", "bank-b")
    assert spec.party("bank-b") == PartySpec("bank-b", DER_B, attest=False)
    assert spec.party("insurer-c") == PartySpec("insurer-c", DER_C, attest=True)
    assert spec.party("nobody") is None
    assert spec.is_recipient("bank-a") and not spec.is_recipient("insurer-c")
    assert not spec.is_recipient("nobody")


def test_canonical_bytes_format() -> None:
    spec = parse_json(base())
    data = spec.canonical_bytes()
    assert b" " not in data and b"\n" not in data
    decoded = json.loads(data)
    assert list(decoded) == sorted(decoded)
    assert decoded["parties"][0] == {
        "attest": True,
        "name": "bank-a",
        "public_key": base64.b64encode(DER_A).decode(),
    }
    assert decoded["deadline"] == 1798758000
    assert decoded["version"] == 1
    no_deadline = base()
    del no_deadline["deadline"], no_deadline["max_items_per_party"]
    decoded = json.loads(parse_json(no_deadline).canonical_bytes())
    assert decoded["deadline"] is None and decoded["max_items_per_party"] is None


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(recipients=["insurer-c", "bank-a", "bank-b"]),
        lambda d: d.pop("recipients"),  # default: every party
        lambda d: d.update(deadline="2026-12-31T23:00:00+00:00"),
        lambda d: d.update(deadline="2026-12-31t23:00:00z"),
        lambda d: d.update(normalize="trim,casefold,trim"),
        lambda d: d["parties"].reverse(),
        lambda d: d["parties"][1].update(public_key=TEXT_B + "\n"),
        lambda d: d["parties"][2].update(public_key=TEXT_A),  # ed25519: form, not PEM
        lambda d: d["parties"][0].update(attest=True),  # the default, spelled out
        lambda d: d.update(_note="ignored", comment_2="ignored", version=1),
        lambda d: d["parties"][0].update(_why="notes are allowed in parties too"),
    ],
)
def test_equivalent_spellings_same_digest(change: Callable[[dict[str, Any]], object]) -> None:
    reference = base()
    reference["recipients"] = ["bank-a", "bank-b", "insurer-c"]
    data = base()
    data["recipients"] = ["bank-a", "bank-b", "insurer-c"]
    change(data)
    assert parse_json(data).digest() == parse_json(reference).digest()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(job_id="q4-customer-overlap2"),
        lambda d: d.update(output="count"),
        lambda d: d.update(min_intersection=101),
        lambda d: d.update(max_items_per_party=None),
        lambda d: d.update(normalize="trim"),
        lambda d: d.update(deadline=1798758001),
        lambda d: d.update(recipients=["bank-a"]),
        lambda d: d["parties"][0].update(attest=False),
        lambda d: d["parties"][0].update(name="insurer-d"),
        lambda d: d["parties"][0].update(
            public_key=public_key_text(public_key_der(generate_private_key()))
        ),
    ],
)
def test_any_change_of_meaning_changes_the_digest(
    change: Callable[[dict[str, Any]], object],
) -> None:
    data = base()
    change(data)
    assert parse_json(data).digest() != parse_json(base()).digest()


def test_toml_native_datetime_and_defaults() -> None:
    toml = f"""
job_id = "j"
deadline = 2026-12-31T23:00:00Z
[[parties]]
name = "a"
public_key = {toml_string(TEXT_A)}
[[parties]]
name = "b"
public_key = {toml_string(TEXT_B)}
"""
    spec = JobSpec.parse(toml.encode(), source="j.toml", fmt="toml")
    assert spec.deadline == 1798758000
    assert spec.output is OutputKind.INTERSECTION
    assert spec.min_intersection == 0
    assert spec.max_items_per_party is None
    assert spec.normalize == "trim"
    assert spec.recipients == ("a", "b")
    assert all(p.attest for p in spec.parties)


def test_canonical_round_trip_and_strictness() -> None:
    spec = parse_json(base())
    data = spec.canonical_bytes()
    assert JobSpec.from_canonical(data) == spec
    assert JobSpec.from_canonical(data).canonical_bytes() == data
    reformatted = json.dumps(json.loads(data), sort_keys=True).encode()  # with spaces
    unsorted = json.dumps(json.loads(data), separators=(",", ":")).encode()
    decoded = json.loads(data)
    decoded["_note"] = "x"
    with_note = json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode()
    for bad in (reformatted, data + b"\n", with_note):
        with pytest.raises(SpecError, match=r"^job spec: "):
            JobSpec.from_canonical(bad)
    if unsorted != data:
        with pytest.raises(SpecError, match=r"^job spec: not in canonical form$"):
            JobSpec.from_canonical(unsorted)
    with pytest.raises(SpecError, match=r"^job spec: invalid JSON"):
        JobSpec.from_canonical(b"{")
    with pytest.raises(SpecError, match=r"^job spec: not canonical JSON \(non-ASCII byte 0\)$"):
        JobSpec.from_canonical("é".encode())
    with pytest.raises(SpecError, match=r"^job spec: larger than"):
        JobSpec.from_canonical(b" " * (1024 * 1024 + 1))
    # PEM in canonical bytes is another spelling: refused
    decoded = json.loads(data)
    decoded["parties"][0]["public_key"] = PEM_A
    with pytest.raises(SpecError, match=r"^job spec: parties\[0\]\.public_key: not valid base64$"):
        JobSpec.from_canonical(json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode())


def test_built_in_code_sorts_and_validates() -> None:
    a, b = PartySpec("b", DER_B), PartySpec("a", DER_A)
    spec = JobSpec(job_id="j", parties=(a, b), recipients=("b", "a"))
    assert [p.name for p in spec.parties] == ["a", "b"]
    assert spec.recipients == ("a", "b")
    assert spec == JobSpec(job_id="j", parties=(b, a), recipients=("a", "b"))
    assert JobSpec.from_canonical(spec.canonical_bytes()) == spec
    with pytest.raises(SpecError, match=r"^JobSpec: recipients: \"c\" is not a party$"):
        JobSpec(job_id="j", parties=(a, b), recipients=("c",))
    with pytest.raises(SpecError, match=r"^JobSpec: parties: 1 listed"):
        JobSpec(job_id="j", parties=(a,), recipients=("b",))
    with pytest.raises(
        SpecError, match=r"^JobSpec: normalize: \"casefold,trim\" is not in canonical form$"
    ):
        JobSpec(job_id="j", parties=(a, b), recipients=("a",), normalize="casefold,trim")
    with pytest.raises(SpecError, match=r"^JobSpec: output:"):
        JobSpec(job_id="j", parties=(a, b), recipients=("a",), output="sum")  # type: ignore[arg-type]
    assert JobSpec(job_id="j", parties=(a, b), recipients=("a",), output="count").output is (  # type: ignore[arg-type]
        OutputKind.COUNT
    )
    with pytest.raises(SpecError, match=r"^PartySpec: public_key: not a DER Sub"):
        PartySpec("a", DER_A + b"\x00")
    compressed = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    compressed += KEY_B.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    with pytest.raises(SpecError, match=r"^PartySpec: public_key: public key is not in canonical"):
        PartySpec("a", compressed)
    with pytest.raises(SpecError, match=r"^PartySpec: name:"):
        PartySpec("-a", DER_A)


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        target: Any = data
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        last = keys[-1]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return change


_DELETE = object()
_IDENT = "use 1-128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
_NOT_RFC3339 = (
    'is not an RFC 3339 UTC time such as "2026-12-31T23:00:00Z" (whole seconds, offset Z or +00:00)'
)
_IGNORED = 'keys starting with "_" or "comment" are ignored'


# (how to break the base spec, the exact one-line error)
ERRORS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no job_id", _set("job_id", _DELETE), "job.json: job_id: missing"),
    (
        "bad job_id",
        _set("job_id", "-q4"),
        f'job.json: job_id: "-q4" is not a valid job id: {_IDENT}',
    ),
    (
        "long job_id",
        _set("job_id", "a" * 129),
        f'job.json: job_id: "{"a" * 36}... is not a valid job id: {_IDENT}',
    ),
    ("job_id type", _set("job_id", 4), "job.json: job_id: expected text, got 4"),
    (
        "unknown key",
        _set("ouput", "count"),
        f"job.json: ouput: unknown key (did you mean output?); {_IGNORED}",
    ),
    (
        "version",
        _set("version", 2),
        "job.json: version: unsupported spec version 2: this teepsi reads 1",
    ),
    (
        "output",
        _set("output", "sum"),
        'job.json: output: expected "intersection" or "count", got "sum"',
    ),
    (
        "output case",
        _set("output", "Count"),
        'job.json: output: expected "intersection" or "count", got "Count"',
    ),
    (
        "min negative",
        _set("min_intersection", -1),
        f"job.json: min_intersection: must be between 0 and {2**63 - 1}, got -1",
    ),
    (
        "min bool",
        _set("min_intersection", True),
        "job.json: min_intersection: expected an integer, got true",
    ),
    (
        "min float",
        _set("min_intersection", 1.0),
        "job.json: min_intersection: expected an integer, got 1.0",
    ),
    (
        "min text",
        _set("min_intersection", "5"),
        'job.json: min_intersection: expected an integer, got "5"',
    ),
    (
        "max zero",
        _set("max_items_per_party", 0),
        f"job.json: max_items_per_party: must be between 1 and {2**63 - 1}, got 0",
    ),
    (
        "max huge",
        _set("max_items_per_party", 2**63),
        f"job.json: max_items_per_party: must be between 1 and {2**63 - 1}, got {2**63}",
    ),
    (
        "max bool",
        _set("max_items_per_party", False),
        "job.json: max_items_per_party: expected an integer, got false",
    ),
    (
        "min over max",
        _set("max_items_per_party", 99),
        "job.json: min_intersection: 100 exceeds max_items_per_party 99: "
        "the result could never be released",
    ),
    (
        "normalize unknown",
        _set("normalize", "trim,upper"),
        'job.json: normalize: unknown normalisation "upper": '
        "use a comma-separated subset of trim, casefold, nfc, or none",
    ),
    (
        "normalize empty",
        _set("normalize", " "),
        'job.json: normalize: is empty: use e.g. "trim", "trim,casefold,nfc" or "none"',
    ),
    (
        "normalize type",
        _set("normalize", ["trim"]),
        'job.json: normalize: expected text such as "trim,casefold", got ["trim"]',
    ),
    (
        "deadline offset",
        _set("deadline", "2026-12-31T23:00:00+01:00"),
        f'job.json: deadline: "2026-12-31T23:00:00+01:00" {_NOT_RFC3339}',
    ),
    (
        "deadline fraction",
        _set("deadline", "2026-12-31T23:00:00.5Z"),
        f'job.json: deadline: "2026-12-31T23:00:00.5Z" {_NOT_RFC3339}',
    ),
    (
        "deadline date",
        _set("deadline", "2026-02-30T00:00:00Z"),
        'job.json: deadline: "2026-02-30T00:00:00Z" is not a valid time: '
        "day is out of range for month",
    ),
    (
        "deadline zero",
        _set("deadline", 0),
        "job.json: deadline: UNIX seconds must be between 1 and 253402300799, got 0",
    ),
    (
        "deadline bool",
        _set("deadline", True),
        "job.json: deadline: expected RFC 3339 UTC text or integer UNIX seconds, got true",
    ),
    (
        "deadline float",
        _set("deadline", 1.5),
        "job.json: deadline: expected RFC 3339 UTC text or integer UNIX seconds, got 1.5",
    ),
    (
        "no parties",
        _set("parties", _DELETE),
        "job.json: parties: missing: list every party with its name and public key",
    ),
    (
        "parties type",
        _set("parties", {"name": "a"}),
        "job.json: parties: expected a list of parties ([[parties]] tables in TOML)",
    ),
    (
        "one party",
        lambda d: d.update(parties=d["parties"][:1], recipients=["insurer-c"]),
        "job.json: parties: 1 listed; a job needs 2 to 256 parties",
    ),
    (
        "too many parties",
        lambda d: d["parties"].extend([{}] * 254),
        "job.json: parties: 257 listed; a job needs 2 to 256 parties",
    ),
    (
        "party type",
        _set("parties.1", "bank-b"),
        "job.json: parties[1]: expected a table with name and public_key",
    ),
    ("party no name", _set("parties.1.name", _DELETE), "job.json: parties[1].name: missing"),
    (
        "party no key",
        _set("parties.1.public_key", _DELETE),
        "job.json: parties[1].public_key: missing",
    ),
    (
        "party bad name",
        _set("parties.1.name", "bank b"),
        f'job.json: parties[1].name: "bank b" is not a valid party name: {_IDENT}',
    ),
    (
        "party unknown key",
        _set("parties.1.atest", False),
        f"job.json: parties[1].atest: unknown key (did you mean attest?); {_IGNORED}",
    ),
    (
        "party attest type",
        _set("parties.1.attest", "yes"),
        'job.json: parties[1].attest: expected true or false, got "yes"',
    ),
    (
        "party attest int",
        _set("parties.1.attest", 1),
        "job.json: parties[1].attest: expected true or false, got 1",
    ),
    (
        "duplicate name",
        _set("parties.2.name", "bank-b"),
        'job.json: parties[2].name: duplicate party name "bank-b" (also parties[1])',
    ),
    (
        "duplicate key",
        _set("parties.2.public_key", TEXT_C),
        "job.json: parties[2].public_key: same key as parties[0]: every party needs its own key",
    ),
    (
        "key type",
        _set("parties.1.public_key", 42),
        "job.json: parties[1].public_key: expected text, got 42",
    ),
    (
        "rsa key",
        _set("parties.1.public_key", _rsa_pem()),
        "job.json: parties[1].public_key: not an Ed25519 or EC public key",
    ),
    (
        "garbage key",
        _set("parties.1.public_key", "ssh-ed25519 AAAA"),
        'job.json: parties[1].public_key: expected "ed25519:<base64>" or a PEM PUBLIC KEY block',
    ),
    (
        "recipients empty",
        _set("recipients", []),
        "job.json: recipients: is empty: name at least one party (omit it for all)",
    ),
    (
        "recipients type",
        _set("recipients", "bank-a"),
        'job.json: recipients: expected a list of party names, got "bank-a"',
    ),
    (
        "recipient unknown",
        _set("recipients.1", "bank-z"),
        'job.json: recipients[1]: "bank-z" is not a party of this job',
    ),
    (
        "recipient twice",
        _set("recipients.1", "bank-b"),
        'job.json: recipients[1]: "bank-b" is listed twice',
    ),
    (
        "recipient type",
        _set("recipients.1", None),
        "job.json: recipients[1]: expected a party name, got null",
    ),
]


@pytest.mark.parametrize(("change", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validation_errors(change: Callable[[dict[str, Any]], None], message: str) -> None:
    data = copy.deepcopy(base())
    change(data)
    with pytest.raises(SpecError) as info:
        parse_json(data)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[1]", "job.json: expected a JSON object at the top level"),
        (b'{"job_id": "a", "job_id": "b"}', "job.json: job_id: duplicate key"),
        (b'{"min_intersection": NaN}', "job.json: invalid JSON: NaN is not allowed"),
        (b'{"job_id": ', "job.json: invalid JSON at line 1 column 12: Expecting value"),
        (b'{"job_id": "\xff"}', "job.json: not UTF-8 text (byte 12)"),
    ],
)
def test_json_syntax_errors(data: bytes, message: str) -> None:
    with pytest.raises(SpecError) as info:
        JobSpec.parse(data, source="job.json", fmt="json")
    assert str(info.value) == message


def test_toml_specific_errors() -> None:
    parties = f"""
[[parties]]
name = "a"
public_key = {toml_string(TEXT_A)}
[[parties]]
name = "b"
public_key = {toml_string(TEXT_B)}
"""

    def error(text: str) -> str:
        with pytest.raises(SpecError) as info:
            JobSpec.parse(text.encode(), source="job.toml", fmt="toml")
        assert "\n" not in str(info.value)
        return str(info.value)

    assert error('job_id = "j"\njob_id = "k"\n').startswith("job.toml: invalid TOML: ")
    assert error("job_id = \n").startswith("job.toml: invalid TOML: ")
    # a top-level key written after [[parties]] lands in the last party
    assert error('job_id = "j"\n' + parties + 'output = "count"\n') == (
        "job.toml: parties[1].output: unknown key in a party (in TOML, top-level keys "
        "must come before the first [[parties]])"
    )
    assert error('job_id = "j"\ndeadline = 2026-12-31T23:00:00\n' + parties) == (
        "job.toml: deadline: a TOML local date-time has no time zone: add Z (UTC)"
    )
    assert error('job_id = "j"\ndeadline = 2026-12-31T23:00:00+02:00\n' + parties) == (
        "job.toml: deadline: must be in UTC (offset Z or +00:00)"
    )
    assert error('job_id = "j"\ndeadline = 2026-12-31T23:00:00.5Z\n' + parties) == (
        "job.toml: deadline: must be whole seconds"
    )
    assert error('job_id = "j"\ndeadline = 2026-12-31\n' + parties) == (
        "job.toml: deadline: expected RFC 3339 UTC text or integer UNIX seconds, got "
        "datetime.date(2026, 12, 31)"
    )
    assert error('job_id = "j"\nmin_intersection = 1.0\n' + parties) == (
        "job.toml: min_intersection: expected an integer, got 1.0"
    )


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=re.escape(f"{tmp_path}/none.toml: cannot read: ")):
        JobSpec.load(tmp_path / "none.toml")
    with pytest.raises(
        SpecError, match=re.escape(f"{tmp_path}/job.yaml: expected a .toml or .json file")
    ):
        JobSpec.load(tmp_path / "job.yaml")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(SpecError, match=re.escape(f"{big}: larger than 1048576 bytes")):
        JobSpec.load(big)
    with pytest.raises(SpecError, match=r"^x: unknown spec format \"yaml\": use toml or json$"):
        JobSpec.parse(b"", source="x", fmt="yaml")
    upper = tmp_path / "JOB.JSON"
    upper.write_text("\ufeff" + json.dumps(base()))  # BOM and upper-case suffix are fine
    assert JobSpec.load(upper) == parse_json(base())


def test_256_parties_is_the_limit() -> None:
    parties = [
        {"name": f"p{i}", "public_key": public_key_text(public_key_der(generate_private_key()))}
        for i in range(256)
    ]
    spec = parse_json({"job_id": "big", "parties": parties})
    assert len(spec.parties) == 256 == len(spec.recipients)
    assert JobSpec.from_canonical(spec.canonical_bytes()) == spec
