"""Tests for the peer-acceptance policy (the seed's dynamic_config.json, made strict)."""

from __future__ import annotations

import copy
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teepsi.attestation.evidence import AttributeFlag, EnclaveIdentity
from teepsi.attestation.policy import (
    MeasurementEntry,
    Policy,
    PolicyError,
    PolicyViolation,
    TcbAllowances,
    policy_for,
)

# The seed's example, byte for byte as the deployment guide prints it.
SEED_EXAMPLE = """{
    "verify_mr_enclave" : "on",
    "verify_mr_signer" : "on",
    "verify_isv_prod_id" : "on",
    "verify_isv_svn" : "on",
    "sgx_mrs": [
        {
            "mr_enclave" : "1e4f3efafac6038dadaa94fdd248b93c82ae9f0a16642ff4bb07afe442aac56e",
            "mr_signer" : "5add213ac35413033647621e2fab91edcc8b82f840426803feb8a603be2ce8d4",
            "isv_prod_id" : "0",
            "isv_svn" : "0"
        }
    ]
}
"""
SEED_MRE = bytes.fromhex("1e4f3efafac6038dadaa94fdd248b93c82ae9f0a16642ff4bb07afe442aac56e")
SEED_MRS = bytes.fromhex("5add213ac35413033647621e2fab91edcc8b82f840426803feb8a603be2ce8d4")

MRE_A = bytes([0xA1]) * 32
MRE_B = bytes([0xB2]) * 32
MRS_A = bytes([0xC3]) * 32
MRS_B = bytes([0xD4]) * 32
SRC = "dynamic_config.json"
FLAGS = ("verify_mr_enclave", "verify_mr_signer", "verify_isv_prod_id", "verify_isv_svn")


def ident(
    mr_enclave: bytes = MRE_A,
    mr_signer: bytes = MRS_A,
    isv_prod_id: int = 1,
    isv_svn: int = 2,
    attribute_flags: int = int(AttributeFlag.INIT | AttributeFlag.MODE64BIT),
) -> EnclaveIdentity:
    return EnclaveIdentity(mr_enclave, mr_signer, isv_prod_id, isv_svn, attribute_flags)


def entry_dict(
    mr_enclave: object = MRE_A,
    mr_signer: object = MRS_A,
    isv_prod_id: object = "1",
    isv_svn: object = "2",
    **extra: object,
) -> dict[str, object]:
    """An sgx_mrs entry; bytes MRs are written as hex, anything else verbatim."""

    def hexed(mr: object) -> object:
        return mr.hex() if isinstance(mr, bytes) else mr

    return {
        "mr_enclave": hexed(mr_enclave),
        "mr_signer": hexed(mr_signer),
        "isv_prod_id": isv_prod_id,
        "isv_svn": isv_svn,
        **extra,
    }


def config(*entries: dict[str, object], **overrides: object) -> dict[str, object]:
    data: dict[str, object] = dict.fromkeys(FLAGS, "on")
    data["sgx_mrs"] = list(entries) if entries else [entry_dict()]
    data.update(overrides)
    return data


def parse(data: object) -> Policy:
    return Policy.from_dict(data, source=SRC)


def parse_error(data: object) -> str:
    with pytest.raises(PolicyError) as info:
        parse(data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}: ")
    return message


def violation(policy: Policy, identity: EnclaveIdentity, status: str = "UpToDate") -> str:
    with pytest.raises(PolicyViolation) as info:
        policy.check(identity, status)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- the seed's file ---------------------------------------------------------------


def test_seed_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(SEED_EXAMPLE, encoding="utf-8")
    policy = Policy.load(path)
    assert (policy.verify_mr_enclave, policy.verify_mr_signer) == (True, True)
    assert (policy.verify_isv_prod_id, policy.verify_isv_svn) == (True, True)
    assert policy.entries == (MeasurementEntry(SEED_MRE, SEED_MRS, 0, 0),)
    assert policy.tcb == TcbAllowances()
    seed_peer = ident(SEED_MRE, SEED_MRS, 0, 0)
    assert policy.check(seed_peer, "UpToDate") == policy.entries[0]


@pytest.mark.parametrize(("raw", "number"), [("0", 0), ("7", 7), (7, 7), ("65535", 65535)])
def test_isv_strings_are_parsed_as_numbers(raw: object, number: int) -> None:
    # the seed's reference read "7" as 0; it must be 7
    policy = parse(config(entry_dict(isv_prod_id=raw, isv_svn=raw)))
    assert policy.entries[0].isv_prod_id == number
    assert policy.entries[0].isv_svn == number


# ---- matching ----------------------------------------------------------------------


def test_exact_match_is_accepted() -> None:
    policy = parse(config(entry_dict(name="teepsi server")))
    assert policy.check(ident(), "UpToDate").name == "teepsi server"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (
            ident(mr_enclave=MRE_B),
            f"peer MRENCLAVE {MRE_B.hex()} matches no sgx_mrs entry "
            f"(closest: sgx_mrs[0] expects {MRE_A.hex()})",
        ),
        (
            ident(mr_signer=MRS_B),
            f"peer MRSIGNER {MRS_B.hex()} matches no sgx_mrs entry "
            f"(closest: sgx_mrs[0] expects {MRS_A.hex()})",
        ),
        (
            ident(isv_prod_id=9),
            "peer ISV_PROD_ID 9 matches no sgx_mrs entry (closest: sgx_mrs[0] expects 1)",
        ),
        (ident(isv_svn=1), "peer ISV_SVN 1 is below the required 2 (sgx_mrs[0])"),
    ],
    ids=["mr_enclave", "mr_signer", "isv_prod_id", "isv_svn"],
)
def test_each_field_mismatch_is_refused(peer: EnclaveIdentity, expected: str) -> None:
    assert violation(parse(config()), peer) == expected


def test_isv_prod_id_equal_not_greater() -> None:
    # only ISV_SVN is a minimum; a higher ISV_PROD_ID is another product
    assert "ISV_PROD_ID 2" in violation(parse(config()), ident(isv_prod_id=2))


@pytest.mark.parametrize(("svn", "accepted"), [(2, True), (3, True), (65535, True), (1, False)])
def test_isv_svn_is_a_minimum(svn: int, accepted: bool) -> None:
    policy = parse(config())
    if accepted:
        policy.check(ident(isv_svn=svn), "UpToDate")
    else:
        assert violation(policy, ident(isv_svn=svn)) == (
            f"peer ISV_SVN {svn} is below the required 2 (sgx_mrs[0])"
        )


def test_any_entry_may_match_second_entry() -> None:
    policy = parse(
        config(
            entry_dict(mr_enclave=MRE_B, name="other"),
            entry_dict(name="wanted"),
        )
    )
    assert policy.check(ident(), "UpToDate").name == "wanted"


def test_fields_must_match_in_the_same_entry() -> None:
    # MRENCLAVE from entry 0 and MRSIGNER from entry 1 is not a match
    policy = parse(config(entry_dict(mr_enclave=MRE_A, mr_signer=MRS_B), entry_dict(MRE_B, MRS_A)))
    violation(policy, ident(MRE_A, MRS_A))


def test_reason_names_closest_entry_and_other_differences() -> None:
    policy = parse(
        config(
            entry_dict(mr_enclave=MRE_B, mr_signer=MRS_B, name="far"),
            entry_dict(isv_svn="5", name="teepsi server"),
        )
    )
    assert violation(policy, ident(isv_svn=3)) == (
        'peer ISV_SVN 3 is below the required 5 (sgx_mrs[1] ("teepsi server"))'
    )
    message = violation(policy, ident(mr_enclave=MRE_B, mr_signer=MRS_B, isv_prod_id=4))
    assert message == (
        'peer ISV_PROD_ID 4 matches no sgx_mrs entry (closest: sgx_mrs[0] ("far") expects 1)'
    )
    message = violation(parse(config()), ident(MRE_B, MRS_B, isv_svn=0))
    assert message.startswith(f"peer MRENCLAVE {MRE_B.hex()} matches no sgx_mrs entry")
    assert message.endswith("; sgx_mrs[0] also differs in MRSIGNER, ISV_SVN")


@pytest.mark.parametrize(
    ("flag", "field", "peer"),
    [
        ("verify_mr_enclave", "mr_enclave", ident(mr_enclave=MRE_B)),
        ("verify_mr_signer", "mr_signer", ident(mr_signer=MRS_B)),
        ("verify_isv_prod_id", "isv_prod_id", ident(isv_prod_id=77)),
        ("verify_isv_svn", "isv_svn", ident(isv_svn=0)),
    ],
)
def test_disabled_flag_ignores_its_field(flag: str, field: str, peer: EnclaveIdentity) -> None:
    # present in the entry but not verified
    policy = parse(config(**{flag: "off"}))
    assert policy.check(peer, "UpToDate") == policy.entries[0]
    # absent from the entry altogether
    entry = entry_dict()
    del entry[field]
    policy = parse(config(entry, **{flag: "off"}))
    assert getattr(policy.entries[0], field) is None
    assert policy.check(peer, "UpToDate") == policy.entries[0]
    # the other fields still count
    violation(policy, ident(mr_enclave=MRE_B, mr_signer=MRS_B, isv_prod_id=77, isv_svn=0))


@pytest.mark.parametrize("field", ["mr_enclave", "mr_signer", "isv_prod_id", "isv_svn"])
def test_disabled_field_is_still_validated(field: str) -> None:
    flag = {"mr_enclave": "verify_mr_enclave", "mr_signer": "verify_mr_signer"}.get(
        field, f"verify_{field}"
    )
    message = parse_error(config(entry_dict(**{field: "junk"}), **{flag: "off"}))
    assert message.startswith(f"{SRC}: sgx_mrs[0].{field}: ")


@pytest.mark.parametrize("field", ["mr_enclave", "mr_signer", "isv_prod_id", "isv_svn"])
def test_enabled_field_required_in_every_entry(field: str) -> None:
    second = entry_dict()
    del second[field]
    message = parse_error(config(entry_dict(), second))
    assert message.startswith(f"{SRC}: sgx_mrs[1].{field}: missing")


def test_all_flags_off_accepts_any_enclave_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="teepsi.attestation.policy"):
        policy = parse(config(**dict.fromkeys(FLAGS, "off"), sgx_mrs=[]))
    assert any("ANY enclave" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    blank = MeasurementEntry(None, None, None, None)
    assert policy.check(ident(MRE_B, MRS_B, 9, 0), "UpToDate") == blank
    # attributes and TCB are still enforced
    assert "DEBUG" in violation(policy, ident(attribute_flags=0x7))
    assert "Revoked" in violation(policy, ident(), "Revoked")


def test_all_flags_off_with_entries_returns_first() -> None:
    policy = parse(config(**dict.fromkeys(FLAGS, False)))
    assert policy.check(ident(MRE_B, MRS_B, 9, 0), "UpToDate") == policy.entries[0]


def test_flags_on_need_at_least_one_entry() -> None:
    message = parse_error(config(sgx_mrs=[], verify_mr_enclave="off"))
    assert message.startswith(f"{SRC}: sgx_mrs: is empty, but verify_mr_signer is on")


# ---- flag syntax -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("on", True), ("ON", True), ("On", True), (True, True)],
        *[("off", False), ("OFF", False), ("oFf", False), (False, False)],
    ],
)
def test_flag_syntax(raw: object, value: bool) -> None:
    policy = parse(config(verify_mr_enclave=raw, allow_outdated_tcb=raw))
    assert policy.verify_mr_enclave is value
    assert policy.tcb.outdated is value


def test_flag_yes_is_refused_with_the_documented_message() -> None:
    assert parse_error(config(verify_mr_enclave="yes")) == (
        f'{SRC}: verify_mr_enclave: expected "on", "off", true or false, got "yes"'
    )


@pytest.mark.parametrize("raw", ["yes", 1, 0, None, "", " on", "on ", "true", "1", [], {}, 1.0])
@pytest.mark.parametrize("key", [*FLAGS, "allow_outdated_tcb", "allow_sw_hardening_needed"])
def test_malformed_flags(key: str, raw: object) -> None:
    message = parse_error(config(**{key: raw}))
    assert message.startswith(f'{SRC}: {key}: expected "on", "off", true or false, got ')


@pytest.mark.parametrize("key", FLAGS)
def test_missing_verify_flag_is_an_error(key: str) -> None:
    data = config()
    del data[key]
    assert parse_error(data).startswith(f"{SRC}: {key}: missing")


def test_allow_flags_default_off() -> None:
    assert parse(config()).tcb == TcbAllowances(False, False, False)


# ---- value syntax ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "0x" + "a" * 62,
        " " + "a" * 63,
        "a" * 62 + " a",
        "a" * 64 + "\n",
        "",
        None,
        12,
        ["a" * 64],
    ],
    ids=lambda raw: repr(raw)[:20],
)
@pytest.mark.parametrize("field", ["mr_enclave", "mr_signer"])
def test_malformed_mr(field: str, raw: object) -> None:
    message = parse_error(config(entry_dict(), entry_dict(**{field: raw})))
    assert message.startswith(f"{SRC}: sgx_mrs[1].{field}: expected 64 hex characters, got ")


def test_mr_of_63_chars_message() -> None:
    assert parse_error(config(entry_dict(mr_signer="ab" * 31 + "a"))).endswith("(63 characters)")


def test_mr_is_case_insensitive() -> None:
    policy = parse(
        config(
            {
                "mr_enclave": MRE_A.hex().upper(),
                "mr_signer": MRS_A.hex(),
                "isv_prod_id": 1,
                "isv_svn": 2,
            }
        )
    )
    assert policy.entries[0].mr_enclave == MRE_A


@pytest.mark.parametrize(
    "raw",
    [
        "0x1",
        1.5,
        1.0,
        -1,
        "-1",
        65536,
        "65536",
        "99999999999999999999999",
        True,
        False,
        "",
        " 1",
        "1 ",
        "+1",
        "1e3",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: str.isdigit() would accept it
        None,
        [],
        {},
    ],
    ids=repr,
)
@pytest.mark.parametrize("field", ["isv_prod_id", "isv_svn"])
def test_malformed_isv(field: str, raw: object) -> None:
    message = parse_error(config(entry_dict(**{field: raw})))
    assert message.startswith(f"{SRC}: sgx_mrs[0].{field}: expected an integer 0..65535")


def test_isv_leading_zeros_are_decimal() -> None:
    # "010" is ten, not octal eight
    assert parse(config(entry_dict(isv_svn="010"))).entries[0].isv_svn == 10


@pytest.mark.parametrize("raw", [None, 3, "two\nlines", ["x"]])
def test_malformed_name(raw: object) -> None:
    assert parse_error(config(entry_dict(name=raw))).startswith(f"{SRC}: sgx_mrs[0].name: ")


# ---- structure ---------------------------------------------------------------------


def test_unknown_top_level_key_is_an_error() -> None:
    message = parse_error(config(verify_mrenclave="on"))
    assert message.startswith(f"{SRC}: verify_mrenclave: unknown key")
    assert "did you mean verify_mr_enclave?" in message


def test_unknown_entry_key_is_an_error() -> None:
    message = parse_error(config(entry_dict(), entry_dict(isv_sv="2")))
    assert message.startswith(f"{SRC}: sgx_mrs[1].isv_sv: unknown key")


def test_unknown_key_with_newline_stays_one_line() -> None:
    parse_error(config(**{"bad\nkey": 1}))


def test_comment_and_underscore_keys_are_ignored() -> None:
    data = config(
        entry_dict(_note="x", comment="server build 3", comments=["a"]),
        _comment="written by hand",
        comment={"anything": 1},
        comment_2="y",
    )
    assert parse(data).entries[0] == MeasurementEntry(MRE_A, MRS_A, 1, 2)


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ([], f"{SRC}: expected a JSON object"),
        ("x", f"{SRC}: expected a JSON object"),
        (config(sgx_mrs={"a": 1}), f"{SRC}: sgx_mrs: expected a list"),
        (config(sgx_mrs=None), f"{SRC}: sgx_mrs: expected a list"),
        (config(sgx_mrs=["x"]), f"{SRC}: sgx_mrs[0]: expected an object"),
    ],
)
def test_malformed_structure(data: object, start: str) -> None:
    assert parse_error(data).startswith(start)


def test_missing_sgx_mrs_is_an_error() -> None:
    data = config()
    del data["sgx_mrs"]
    assert parse_error(data).startswith(f"{SRC}: sgx_mrs: missing")


def test_from_dict_does_not_modify_input() -> None:
    data = config(entry_dict(name="n"), allow_outdated_tcb=True)
    before = copy.deepcopy(data)
    parse(data)
    assert data == before


def test_policy_error_is_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


def test_direct_construction_keeps_invariants() -> None:
    with pytest.raises(PolicyError):
        Policy(True, True, True, True, entries=())
    with pytest.raises(PolicyError):
        Policy(True, False, False, False, entries=(MeasurementEntry(None, MRS_A, 1, 1),))
    with pytest.raises(PolicyError):
        MeasurementEntry(b"short", None, None, None)
    with pytest.raises(PolicyError):
        MeasurementEntry(None, None, 70000, None)
    with pytest.raises(PolicyError):
        TcbAllowances(outdated="off")  # type: ignore[arg-type]


# ---- attributes --------------------------------------------------------------------

INIT, DEBUG, MODE64 = AttributeFlag.INIT, AttributeFlag.DEBUG, AttributeFlag.MODE64BIT
PROV, EINIT = AttributeFlag.PROVISION_KEY, AttributeFlag.EINITTOKEN_KEY


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (INIT | MODE64 | DEBUG, "peer is a DEBUG enclave"),
        (MODE64, "INIT"),
        (INIT, "MODE64BIT"),
        (INIT | MODE64 | PROV, "PROVISION_KEY"),
        (INIT | MODE64 | EINIT, "EINITTOKEN_KEY"),
        (0, "INIT"),
    ],
)
def test_attribute_rules(flags: int, reason: str) -> None:
    # even with every allowance, and with a matching measurement
    policy = parse(
        config(
            **dict.fromkeys(
                ["allow_outdated_tcb", "allow_hw_config_needed", "allow_sw_hardening_needed"], "on"
            )
        )
    )
    assert reason in violation(policy, ident(attribute_flags=int(flags)))


def test_good_attributes_ignore_other_bits() -> None:
    policy = parse(config())
    policy.check(ident(attribute_flags=int(INIT | MODE64) | 0x80), "UpToDate")  # KSS bit


def test_check_order_attributes_then_tcb_then_entries() -> None:
    policy = parse(config())
    bad_everything = ident(mr_enclave=MRE_B, attribute_flags=int(INIT | MODE64 | DEBUG))
    assert "DEBUG" in violation(policy, bad_everything, "Revoked")
    assert "Revoked" in violation(policy, ident(mr_enclave=MRE_B), "Revoked")
    assert "MRENCLAVE" in violation(policy, ident(mr_enclave=MRE_B), "UpToDate")


# ---- TCB status --------------------------------------------------------------------

# status -> (needs outdated, needs hw config, needs sw hardening); written out by hand
TCB_TABLE = {
    "UpToDate": (False, False, False),
    "SWHardeningNeeded": (False, False, True),
    "ConfigurationNeeded": (False, True, False),
    "ConfigurationAndSWHardeningNeeded": (False, True, True),
    "OutOfDate": (True, False, False),
    "OutOfDateConfigurationNeeded": (True, True, False),
}
ALLOWANCE_COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(
    "allow", ALLOWANCE_COMBOS, ids=lambda a: "allow=" + "".join(map(str, map(int, a)))
)
@pytest.mark.parametrize("status", [*TCB_TABLE])
def test_tcb_status_table(status: str, allow: tuple[bool, bool, bool]) -> None:
    tcb = TcbAllowances(*allow)
    accepted = all(have or not need for have, need in zip(allow, TCB_TABLE[status], strict=True))
    policy = parse(config()).with_tcb(tcb)
    if accepted:
        tcb.check(status)
        policy.check(ident(), status)
    else:
        with pytest.raises(PolicyViolation, match=f"^TCB status {status} is not allowed"):
            tcb.check(status)
        violation(policy, ident(), status)


@pytest.mark.parametrize(
    "status",
    ["Revoked", "", "uptodate", "UPTODATE", "UpToDate ", "TDRelaunchAdvised", "Unknown", "None"],
)
def test_revoked_and_unknown_statuses_always_refused(status: str) -> None:
    everything = TcbAllowances(True, True, True)
    with pytest.raises(PolicyViolation) as info:
        everything.check(status)
    assert "\n" not in str(info.value)


def test_tcb_messages() -> None:
    with pytest.raises(PolicyViolation) as info:
        TcbAllowances().check("OutOfDate")
    assert str(info.value) == (
        'TCB status OutOfDate is not allowed (set allow_outdated_tcb to "on" to accept it)'
    )
    with pytest.raises(PolicyViolation) as info:
        TcbAllowances(hw_config_needed=True).check("ConfigurationAndSWHardeningNeeded")
    assert str(info.value) == (
        "TCB status ConfigurationAndSWHardeningNeeded is not allowed "
        '(set allow_sw_hardening_needed to "on" to accept it)'
    )
    with pytest.raises(PolicyViolation) as info:
        TcbAllowances().check("OutOfDateConfigurationNeeded")
    assert "allow_outdated_tcb and allow_hw_config_needed" in str(info.value)
    with pytest.raises(PolicyViolation, match=r"^TCB status Revoked is always refused$"):
        TcbAllowances(True, True, True).check("Revoked")


def test_allow_flags_from_file_apply() -> None:
    policy = parse(config(allow_outdated_tcb="on", allow_hw_config_needed=True))
    assert policy.tcb == TcbAllowances(outdated=True, hw_config_needed=True)
    policy.check(ident(), "OutOfDateConfigurationNeeded")
    violation(policy, ident(), "SWHardeningNeeded")


def test_with_tcb_widens_never_narrows() -> None:
    policy = parse(config(allow_outdated_tcb="on"))
    assert policy.with_tcb(TcbAllowances()) == policy
    wider = policy.with_tcb(TcbAllowances(sw_hardening_needed=True))
    assert wider.tcb == TcbAllowances(outdated=True, sw_hardening_needed=True)
    assert wider.entries == policy.entries
    assert policy.tcb == TcbAllowances(outdated=True)  # the original is unchanged


# ---- round trip and files ----------------------------------------------------------


def test_to_dict_uses_the_seed_schema() -> None:
    policy = parse(config(entry_dict(isv_prod_id=1, isv_svn=2, name="srv"), verify_isv_svn=False))
    assert policy.to_dict() == {
        "verify_mr_enclave": "on",
        "verify_mr_signer": "on",
        "verify_isv_prod_id": "on",
        "verify_isv_svn": "off",
        "allow_outdated_tcb": "off",
        "allow_hw_config_needed": "off",
        "allow_sw_hardening_needed": "off",
        "sgx_mrs": [
            {
                "name": "srv",
                "mr_enclave": MRE_A.hex(),
                "mr_signer": MRS_A.hex(),
                "isv_prod_id": "1",
                "isv_svn": "2",
            }
        ],
    }


def test_round_trip_through_json() -> None:
    partial = entry_dict()
    del partial["isv_svn"]
    policy = parse(
        config(entry_dict(name="a"), partial, verify_isv_svn="off", allow_hw_config_needed="on")
    )
    again = Policy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy


def test_seed_round_trip() -> None:
    policy = Policy.from_dict(json.loads(SEED_EXAMPLE))
    assert Policy.from_dict(policy.to_dict()) == policy


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read")
    assert "\n" not in message


def test_load_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path)


def test_load_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text('{\n  "verify_mr_enclave": "on",\n  "sgx_mrs": [,]\n}\n', encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid JSON at line 3 column ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SEED_EXAMPLE.replace('"on",', '"on", "verify_mr_enclave": "off",', 1), "duplicate key"),
        (SEED_EXAMPLE.replace('"0"', "NaN", 1), "NaN is not allowed"),
        ("", "invalid JSON at line 1 column 1"),
        ("[" * 100_000, "invalid JSON"),
    ],
    ids=["duplicate", "nan", "empty", "deep"],
)
def test_load_refuses_ambiguous_json(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_load_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b'{"verify_mr_enclave": "\xff"}')
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(path)


def test_load_errors_use_the_path_as_source(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(SEED_EXAMPLE.replace('"isv_svn" : "0"', '"isv_svn" : "0x1"'), "utf-8")
    with pytest.raises(PolicyError, match=r"^.*dynamic_config\.json: sgx_mrs\[0\]\.isv_svn: "):
        Policy.load(str(path))


def test_load_accepts_bom(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + SEED_EXAMPLE.encode())
    assert Policy.load(path).entries[0].mr_enclave == SEED_MRE


# ---- policy_for --------------------------------------------------------------------


def test_policy_for() -> None:
    server = ident(isv_prod_id=1, isv_svn=0)
    provider = ident(mr_enclave=MRE_B, isv_prod_id=2, isv_svn=0)
    policy = policy_for([("teepsi server", server), ("teepsi data provider", provider)])
    assert (policy.verify_mr_enclave, policy.verify_mr_signer) == (True, True)
    assert (policy.verify_isv_prod_id, policy.verify_isv_svn) == (True, True)
    assert policy.check(server, "UpToDate").name == "teepsi server"
    assert policy.check(provider, "UpToDate").name == "teepsi data provider"
    violation(policy, ident(mr_enclave=MRE_B, isv_prod_id=1, isv_svn=0))
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_policy_for_needs_an_identity() -> None:
    with pytest.raises(PolicyError):
        policy_for([])


# ---- properties --------------------------------------------------------------------

mrs = st.binary(min_size=32, max_size=32)
u16 = st.integers(0, 0xFFFF)
identities = st.builds(EnclaveIdentity, mrs, mrs, u16, u16)


@given(u16, st.booleans())
def test_isv_parse_property(number: int, as_string: bool) -> None:
    raw: Any = str(number) if as_string else number
    assert parse(config(entry_dict(isv_svn=raw))).entries[0].isv_svn == number


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=0x10000)), st.booleans())
def test_isv_out_of_range_property(number: int, as_string: bool) -> None:
    raw: Any = str(number) if as_string else number
    parse_error(config(entry_dict(isv_prod_id=raw)))


@given(identities, st.integers(0, 31), st.integers(1, 255), st.data())
def test_measured_identity_accepted_and_one_byte_change_refused(
    peer: EnclaveIdentity, index: int, delta: int, data: st.DataObject
) -> None:
    policy = policy_for([("peer", peer)])
    assert policy.check(peer, "UpToDate").name == "peer"
    field = data.draw(st.sampled_from(["mr_enclave", "mr_signer"]))
    changed = bytearray(getattr(peer, field))
    changed[index] = (changed[index] + delta) % 256
    other = EnclaveIdentity(
        **{
            **{f: getattr(peer, f) for f in ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")},
            field: bytes(changed),
        }
    )
    assert "matches no sgx_mrs entry" in violation(policy, other)


@given(identities, u16)
def test_svn_property(peer: EnclaveIdentity, required: int) -> None:
    entry = MeasurementEntry(peer.mr_enclave, peer.mr_signer, peer.isv_prod_id, required)
    policy = Policy(True, True, True, True, entries=(entry,))
    if peer.isv_svn >= required:
        assert policy.check(peer, "UpToDate") == entry
    else:
        violation(policy, peer)


optional_mr = st.one_of(st.none(), mrs)
optional_u16 = st.one_of(st.none(), u16)
entries_st = st.builds(
    MeasurementEntry,
    optional_mr,
    optional_mr,
    optional_u16,
    optional_u16,
    st.one_of(st.none(), st.text().filter(str.isprintable)),
)


@given(
    st.lists(entries_st, max_size=4),
    st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_round_trip_property(entries: list[MeasurementEntry], allow: tuple[bool, ...]) -> None:
    # enable exactly the fields every entry has, so the policy is valid
    def verifiable(attr: str) -> bool:
        return bool(entries) and all(getattr(e, attr) is not None for e in entries)

    policy = Policy(
        verify_mr_enclave=verifiable("mr_enclave"),
        verify_mr_signer=verifiable("mr_signer"),
        verify_isv_prod_id=verifiable("isv_prod_id"),
        verify_isv_svn=verifiable("isv_svn"),
        entries=tuple(entries),
        tcb=TcbAllowances(*allow),
    )
    text = json.dumps(policy.to_dict())
    assert Policy.from_dict(json.loads(text)) == policy
