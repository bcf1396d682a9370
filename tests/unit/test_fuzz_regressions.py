"""Regression tests for what the atheris harnesses (fuzz/) found.

Every test states the contract the fuzzer checks: a parser refuses bad input with its own
one-line error type, never with a stray exception. Tests of issues still open in src/ are
marked ``xfail(strict=True)`` with the exact exception seen: once src/ is fixed they
pass, strict xfail turns that into a failure, and the marker (and the issue's entry in
``fuzz/_support.py``'s KNOWN_ISSUES) must then be removed. docs/fuzzing.md lists the
issues and their fixes. Reproducers found by the fuzzer are in ``fuzz/crashes/<harness>/``.
"""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path

import pytest

from teepsi.attestation.policy import Policy, PolicyError
from teepsi.attestation.quote import HEADER_SIZE, REPORT_BODY_SIZE, parse_quote
from teepsi.attestation.sim import SimPlatform
from teepsi.contract.audit import AuditError, AuditLog, verify_audit_log
from teepsi.contract.receipt import ReceiptError, SignedReceipt
from teepsi.contract.spec import JobSpec, SpecError

CRASHES = Path(__file__).resolve().parents[2] / "fuzz" / "crashes"

#: More digits than Python converts by default (sys.get_int_max_str_digits() is 4300).
HUGE_INT = b"1" * 5000

_POLICY_FLAGS = {
    "verify_mr_enclave": "off",
    "verify_mr_signer": "off",
    "verify_isv_prod_id": "off",
    "verify_isv_svn": "off",
    "sgx_mrs": [],
}


def _nested_list(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


# --- F1: TOML nested deeper than the interpreter's recursion limit -----------------------


@pytest.mark.parametrize(
    "text",
    [b"job_id = " + b"[" * 2000 + b"]" * 2000, b"a = " + b"{b=" * 2000 + b"1" + b"}" * 2000],
    ids=["arrays", "inline-tables"],
)
def test_f1_deeply_nested_toml_spec_is_a_spec_error(text: bytes) -> None:
    with pytest.raises(SpecError, match=r"spec\.toml: "):
        JobSpec.parse(text, source="spec.toml", fmt="toml")


# --- F2: a TOML integer too long for int() -----------------------------------------------


def test_f2_huge_toml_integer_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"spec\.toml: "):
        JobSpec.parse(b"min_intersection = " + HUGE_INT, source="spec.toml", fmt="toml")


# --- F3: a JSON integer too long for int(), in specs and receipts ------------------------


@pytest.mark.parametrize("where", ["spec-json", "canonical-spec", "receipt"])
def test_f3_huge_json_integer_is_refused_with_the_documented_error(where: str) -> None:
    document = b'{"version": ' + HUGE_INT + b"}"
    if where == "spec-json":
        with pytest.raises(SpecError, match=r"spec\.json: "):
            JobSpec.parse(document, source="spec.json", fmt="json")
    elif where == "canonical-spec":
        with pytest.raises(SpecError, match="job spec: "):
            JobSpec.from_canonical(document.replace(b" ", b""))
    else:
        with pytest.raises(ReceiptError, match="receipt: "):
            SignedReceipt.from_json(b'{"receipt":' + HUGE_INT + b"}")


# --- F4: the same in policy files ----------------------------------------------------------


def test_f4_huge_json_integer_in_policy_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_bytes(b'{"verify_isv_svn": ' + HUGE_INT + b"}")
    with pytest.raises(PolicyError, match=r"dynamic_config\.json: "):
        Policy.load(path)


# --- F5/F6: error messages that cannot show a deeply nested value ------------------------


def test_f5_spec_error_message_of_a_deeply_nested_json_value() -> None:
    # Just inside json's nesting limit wherever the call stack stands: some depth parses,
    # and then the message about the bad job_id must still be a SpecError.
    for depth in range(1000, 600, -1):
        text = b'{"job_id": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(SpecError):
            JobSpec.parse(text, source="spec.json", fmt="json")


def test_f5_show_of_a_deeply_nested_value() -> None:
    from teepsi.contract._common import show

    assert len(show(_nested_list(5000))) <= 40


def test_f6_policy_error_message_of_a_deeply_nested_json_value(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    for depth in range(1000, 600, -1):
        path.write_bytes(b'{"verify_mr_enclave": ' + b"[" * depth + b"]" * depth + b"}")
        with pytest.raises(PolicyError):
            Policy.load(path)


def test_f6_policy_from_dict_with_a_deeply_nested_value() -> None:
    with pytest.raises(PolicyError, match="policy: sgx_mrs: expected a list"):
        Policy.from_dict({**_POLICY_FLAGS, "sgx_mrs": {"x": _nested_list(5000)}})


# --- F7: ParsedQuote.signed_bytes is not what was signed -----------------------------------


def test_f7_signed_bytes_are_the_quotes_own_bytes() -> None:
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity

    quote = bytearray(SimPlatform().quote(sim_identity(Role.SERVER), bytes(64)))
    quote[HEADER_SIZE + 20] = 1  # reserved1 of the report body (offsets 20..31)
    signed = bytes(quote[: HEADER_SIZE + REPORT_BODY_SIZE])
    assert parse_quote(bytes(quote)).signed_bytes == signed


# --- F8: error messages that cannot show an integer too long for str() ------------------

#: TOML reads hexadecimal integers without Python's 4300-digit limit on decimal
#: conversion, so the value parses, and then str() of it fails.
HUGE_HEX = b"0x" + b"f" * 4000


@pytest.mark.parametrize("field", ["job_id", "min_intersection", "deadline"])
def test_f8_huge_toml_hex_integer_is_a_spec_error(field: str) -> None:
    text = (b"" if field == "job_id" else b'job_id = "j"\n') + field.encode() + b" = " + HUGE_HEX
    with pytest.raises(SpecError, match=rf"spec\.toml: {field}: "):
        JobSpec.parse(text, source="spec.toml", fmt="toml")


# --- F9: tomllib takes quadratic time on deeply dotted keys ---------------------------------

#: A fixed parser refuses these in milliseconds; today each takes well over a second.
SLOW_SECONDS = 0.25


@pytest.mark.parametrize(
    "text",
    [
        b"a" + b".b" * 12_000 + b" = 1",
        b"["
        + b".".join(b"h%d" % i for i in range(1000))
        + b"]\n"
        + b"".join(b"k%d=1\n" % i for i in range(8000)),
    ],
    ids=["dotted-key", "deep-header"],
)
def test_f9_deeply_dotted_toml_is_refused_quickly(text: bytes) -> None:
    started = time.monotonic()
    with pytest.raises(SpecError):
        JobSpec.parse(text, source="spec.toml", fmt="toml")
    elapsed = time.monotonic() - started
    assert elapsed < SLOW_SECONDS, f"parsing took {elapsed:.1f} s"


# --- contracts that hold (the fuzzer checks them too; these pin them down) -----------------


def test_truncated_quote_is_a_format_error() -> None:
    from teepsi.attestation.quote import QuoteFormatError

    header = struct.pack("<HHI", 3, 2, 0) + bytes(40)
    for size in (0, 1, 47, 48, 431, 432, 435):
        with pytest.raises(QuoteFormatError):
            parse_quote((header + bytes(400))[:size])


def test_deeply_nested_json_spec_beyond_the_limit_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        JobSpec.parse(b"[" * 100_000, source="spec.json", fmt="json")


# --- F10: a JSON integer too long for int() in an audit log line ---------------------------


def test_f10_huge_json_integer_in_an_audit_log_is_an_audit_error(tmp_path: Path) -> None:
    """The host writes the audit log: `audit verify` and a restarting server read it."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":' + HUGE_INT + b"}\n")
    with pytest.raises(AuditError, match=r"audit\.jsonl: line 1: not a JSON entry \(invalid JSON"):
        verify_audit_log(path)
    with pytest.raises(AuditError, match=r"line 1: not a JSON entry"):
        AuditLog(path)


# --- F11: an unknown normalisation holding a newline, echoed into the message -----------


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_f11_unknown_normalisation_with_a_newline_is_one_line(fmt: str) -> None:
    text = (
        b'{"version": 1, "job_id": "j", "normalize": "trim,nfc\\nx"}'
        if fmt == "json"
        else b'version = 1\njob_id = "j"\nnormalize = "trim,nfc\\nx"\n'
    )
    with pytest.raises(SpecError, match="unknown normalisation") as refused:
        JobSpec.parse(text, source="spec", fmt=fmt)
    assert "\n" not in str(refused.value)


# --- every reproducer the fuzzer saved, replayed as its harness runs it -------------------

#: Issues still open in src/: the exception their reproducers raise today.
OPEN_ISSUES: dict[str, type[BaseException]] = {}


def _replay(harness: str, data: bytes, tmp_path: Path) -> None:
    """The harness's calls, without atheris; only the documented errors are caught."""
    if harness == "spec":
        for fmt in ("toml", "json"):
            with contextlib.suppress(SpecError):
                JobSpec.parse(data, source="fuzz", fmt=fmt)
        with contextlib.suppress(SpecError):
            JobSpec.from_canonical(data)
    elif harness == "policy":
        path = tmp_path / "dynamic_config.json"
        path.write_bytes(data)
        with contextlib.suppress(PolicyError):
            Policy.load(path)
    elif harness == "receipt":
        with contextlib.suppress(ReceiptError):
            SignedReceipt.from_json(data)
        with contextlib.suppress(ReceiptError, UnicodeDecodeError):
            SignedReceipt.from_json(data.decode("utf-8"))  # files are read as text too
    elif harness == "audit":
        path = tmp_path / "audit.jsonl"
        path.write_bytes(data)
        with contextlib.suppress(AuditError):
            verify_audit_log(path)
    else:
        raise AssertionError(f"no replay for harness {harness}: add one")


def _reproducer_params() -> list[object]:
    params: list[object] = []
    for path in sorted(CRASHES.glob("*/*")):
        if not path.is_file():
            continue
        key = path.name.split("-")[1] if path.name.startswith("known-") else ""
        marks = (
            [pytest.mark.xfail(strict=True, raises=OPEN_ISSUES[key], reason=f"{key} is open")]
            if key in OPEN_ISSUES
            else []
        )
        params.append(pytest.param(path, marks=marks, id=f"{path.parent.name}/{path.name}"))
    return params


@pytest.mark.parametrize("path", _reproducer_params())
def test_saved_reproducer_is_refused_with_the_documented_error(path: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    _replay(path.parent.name, path.read_bytes(), tmp_path)
    elapsed = time.monotonic() - started
    assert elapsed < SLOW_SECONDS, f"replay took {elapsed:.1f} s"
