"""Which attested peers are accepted: the seed's ``dynamic_config.json``, made strict.

Schema (Intel cczoo/psi's ``dynamic_config.json``, unchanged, plus optional extensions)::

    {"verify_mr_enclave": "on", "verify_mr_signer": "on",
     "verify_isv_prod_id": "on", "verify_isv_svn": "on",
     "allow_outdated_tcb": "off", "allow_hw_config_needed": "off",
     "allow_sw_hardening_needed": "off",
     "sgx_mrs": [{"name": "teepsi server",
                  "mr_enclave": "<64 hex>", "mr_signer": "<64 hex>",
                  "isv_prod_id": "1", "isv_svn": "0"}]}

Meaning: a peer is accepted when ANY ``sgx_mrs`` entry matches on EVERY enabled field
(MRENCLAVE, MRSIGNER and ISV_PROD_ID equal; ISV_SVN greater or equal), its SGX
attributes pass Gramine's fixed rules, and its TCB status is UpToDate or explicitly
allowed. Parsing fails closed:

* all four ``verify_*`` flags are required (the seed's files always carry them, and a
  missing flag must not silently mean "off");
* flags are ``"on"``/``"off"`` (any case) or JSON ``true``/``false``; the ``allow_*``
  flags are optional and default to off;
* ``sgx_mrs`` is required; it must be non-empty unless every ``verify_*`` flag is off
  (then any enclave on a genuine platform is accepted, and a warning is logged);
* a field that is verified must be present in every entry; an unverified field may be
  absent, but is still validated when present;
* MRs are exactly 64 hex digits; ISV values are JSON integers or decimal strings in
  0..65535 (the seed's reference silently read strings as 0);
* unknown keys are errors, except keys starting with ``_`` or ``comment``, which are
  ignored everywhere so that files can carry notes;
* two optional collateral rules (teepsi extensions), absent meaning "no rule":
  ``min_tcb_evaluation_data_number`` (an integer 0..2^32-1: TCB info and QE identity
  must carry at least this tcbEvaluationDataNumber, e.g. the number of Intel's latest
  TCB recovery) and ``max_collateral_age_days`` (an integer 1..3650: no document of the
  collateral may be issued longer ago than this, as of the verification time);
* :meth:`Policy.load` also refuses duplicate keys and NaN/Infinity.

TDX virtual machines (teepsi extension) are listed in ``tdx_mrs`` beside ``sgx_mrs``;
a TD is accepted when ANY entry matches on EVERY field the entry sets::

    "tdx_mrs": [{"name": "teepsi VM image 2026-12",
                 "mr_td": "<96 hex>",                      # required
                 "rtmr0": "<96 hex>", ..., "rtmr3": "<96 hex>",   # each optional
                 "mr_config_id": "<96 hex>", "mr_owner": "<96 hex>",
                 "mr_owner_config": "<96 hex>",              # optional
                 "mr_seam": ["<96 hex>", ...],               # allowed TDX modules
                 "min_tee_tcb_svn": "<32 hex>",              # each byte a minimum
                 "xfam": "<16 hex>"}]                        # exact, as the report shows

A TD with the DEBUG attribute is always refused, and one without SEPT_VE_DISABLE too;
the TCB status rules (``allow_*``) and collateral rules are the same as for SGX. With
``tdx_mrs`` present, ``sgx_mrs`` may be absent or empty: then no SGX enclave is
accepted. Without ``tdx_mrs`` no TD is accepted.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.attestation.evidence import (
    AttributeFlag,
    EnclaveIdentity,
    TdAttributeFlag,
    TdIdentity,
)
from teepsi.jsontext import read_user_text, show, strict_json_loads

if TYPE_CHECKING:
    from teepsi.attestation.collateral import CollateralInfo

__all__ = [
    "MeasurementEntry",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "TcbAllowances",
    "TdxEntry",
    "policy_for",
    "tdx_entry_for",
]

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]*")
_DECIMAL = re.compile(r"[0-9]+")
_MAX_U16 = 0xFFFF

_VERIFY_KEYS = ("verify_mr_enclave", "verify_mr_signer", "verify_isv_prod_id", "verify_isv_svn")
_ALLOW_KEYS = ("allow_outdated_tcb", "allow_hw_config_needed", "allow_sw_hardening_needed")
_MIN_EVALUATION_KEY = "min_tcb_evaluation_data_number"
_MAX_AGE_KEY = "max_collateral_age_days"
_MAX_EVALUATION_NUMBER = 0xFFFFFFFF
_MAX_AGE_DAYS = 3650
_DAY_SECONDS = 24 * 3600
_TDX_KEY = "tdx_mrs"
_TOP_KEYS = (
    *_VERIFY_KEYS,
    *_ALLOW_KEYS,
    "sgx_mrs",
    _TDX_KEY,
    _MIN_EVALUATION_KEY,
    _MAX_AGE_KEY,
)
# tdx_mrs entry: (JSON key, TdIdentity attribute, label) of the 48-byte registers
_TDX_REGISTERS = (
    ("mr_td", "mr_td", "MRTD"),
    ("rtmr0", "rt_mr0", "RTMR0"),
    ("rtmr1", "rt_mr1", "RTMR1"),
    ("rtmr2", "rt_mr2", "RTMR2"),
    ("rtmr3", "rt_mr3", "RTMR3"),
    ("mr_config_id", "mr_config_id", "MRCONFIGID"),
    ("mr_owner", "mr_owner", "MROWNER"),
    ("mr_owner_config", "mr_owner_config", "MROWNERCONFIG"),
)
_TDX_ENTRY_KEYS = (
    *(key for key, _, _ in _TDX_REGISTERS),
    "mr_seam",
    "min_tee_tcb_svn",
    "xfam",
    "name",
)
# (entry attribute / JSON key, label used in messages, flag that enables it)
_FIELDS = (
    ("mr_enclave", "MRENCLAVE", "verify_mr_enclave"),
    ("mr_signer", "MRSIGNER", "verify_mr_signer"),
    ("isv_prod_id", "ISV_PROD_ID", "verify_isv_prod_id"),
    ("isv_svn", "ISV_SVN", "verify_isv_svn"),
)
_ENTRY_KEYS = (*(f for f, _, _ in _FIELDS), "name")
_LABELS = {attr: label for attr, label, _ in _FIELDS}

# TCB status (as dcap-qvl reports it) -> the allowances it needs, all of them.
_TCB_NEEDS: dict[str, tuple[str, ...]] = {
    "UpToDate": (),
    "SWHardeningNeeded": ("allow_sw_hardening_needed",),
    "ConfigurationNeeded": ("allow_hw_config_needed",),
    "ConfigurationAndSWHardeningNeeded": ("allow_hw_config_needed", "allow_sw_hardening_needed"),
    "OutOfDate": ("allow_outdated_tcb",),
    "OutOfDateConfigurationNeeded": ("allow_outdated_tcb", "allow_hw_config_needed"),
}


class PolicyError(ValueError):
    """The policy file is unreadable or malformed; the message is one line."""


class PolicyViolation(Exception):
    """A peer is refused by the policy; the message is one line saying why."""


class TcbStatusRefused(PolicyViolation):
    """The peer's platform TCB status is not accepted (the metrics count it apart)."""


def _is_ignored_key(key: str) -> bool:
    return key.startswith(("_", "comment"))


def _check_keys(obj: dict[object, object], allowed: Sequence[str], prefix: str) -> None:
    """Refuse unknown keys; ``prefix`` is ``"<source>: "`` or ``"<source>: sgx_mrs[i]."``."""
    for key in obj:
        if not isinstance(key, str):
            raise PolicyError(f"{prefix}{show(key)}: keys must be strings")
        if key in allowed or _is_ignored_key(key):
            continue
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        shown = key if key.isprintable() and len(key) <= 60 else show(key)  # stay one line
        raise PolicyError(
            f'{prefix}{shown}: unknown key{suggestion}; keys starting with "_" or '
            '"comment" are ignored'
        )


def _parse_flag(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    # isascii(): no Unicode look-alikes that happen to lower() to "on"
    if isinstance(value, str) and value.isascii() and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise PolicyError(f'{where}: expected "on", "off", true or false, got {show(value)}')


def _parse_mr(value: object, where: str) -> bytes:
    # fullmatch, not bytes.fromhex alone: fromhex would accept spaces
    if isinstance(value, str) and _HEX64.fullmatch(value):
        return bytes.fromhex(value)
    detail = f" ({len(value)} characters)" if isinstance(value, str) else ""
    raise PolicyError(f"{where}: expected 64 hex characters, got {show(value)}{detail}")


def _parse_hex(value: object, where: str, size: int) -> bytes:
    """Exactly ``2 * size`` hex digits (no spaces, no 0x) as ``size`` bytes."""
    if isinstance(value, str) and len(value) == 2 * size and _HEX_DIGITS.fullmatch(value):
        return bytes.fromhex(value)
    detail = f" ({len(value)} characters)" if isinstance(value, str) else ""
    raise PolicyError(f"{where}: expected {2 * size} hex characters, got {show(value)}{detail}")


def _parse_int(value: object, where: str, low: int, high: int) -> int:
    """A JSON integer or decimal string in low..high (never a bool, float or null)."""
    # bool is an int subclass in Python: true must not read as 1
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        digits = value.lstrip("0") or "0"
        # bound the length before int(): a huge digit string is simply out of range
        number = int(digits) if len(digits) <= len(str(high)) else high + 1
    if number is None or not low <= number <= high:
        raise PolicyError(
            f"{where}: expected an integer {low}..{high} (JSON number or decimal string), "
            f"got {show(value)}"
        )
    return number


def _parse_u16(value: object, where: str) -> int:
    return _parse_int(value, where, 0, _MAX_U16)


def _parse_name(value: object, where: str) -> str:
    # the name ends up in one-line log and error messages: keep it on one line
    if isinstance(value, str) and value.isprintable():
        return value
    raise PolicyError(f"{where}: expected a single line of text, got {show(value)}")


@dataclass(frozen=True)
class MeasurementEntry:
    """One ``sgx_mrs`` entry; None means the field is absent from the entry."""

    mr_enclave: bytes | None
    mr_signer: bytes | None
    isv_prod_id: int | None
    isv_svn: int | None
    name: str | None = None

    def __post_init__(self) -> None:
        # backstop for entries built in code; from_dict reports errors with their path
        for attr in ("mr_enclave", "mr_signer"):
            mr = getattr(self, attr)
            if mr is not None and (not isinstance(mr, bytes) or len(mr) != 32):
                raise PolicyError(f"MeasurementEntry: {attr}: must be 32 bytes")
        for attr in ("isv_prod_id", "isv_svn"):
            v = getattr(self, attr)
            if v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_U16
            ):
                raise PolicyError(f"MeasurementEntry: {attr}: must be an integer 0..65535")

    def label(self, index: int) -> str:
        """``sgx_mrs[i]`` plus the entry's name when it has one."""
        return f"sgx_mrs[{index}]" + (f" ({show(self.name)})" if self.name else "")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.mr_enclave is not None:
            out["mr_enclave"] = self.mr_enclave.hex()
        if self.mr_signer is not None:
            out["mr_signer"] = self.mr_signer.hex()
        # decimal strings, as the seed writes them; from_dict parses them as numbers
        if self.isv_prod_id is not None:
            out["isv_prod_id"] = str(self.isv_prod_id)
        if self.isv_svn is not None:
            out["isv_svn"] = str(self.isv_svn)
        return out


@dataclass(frozen=True)
class TdxEntry:
    """One ``tdx_mrs`` entry; None means the entry does not constrain that field."""

    mr_td: bytes
    rt_mr0: bytes | None = None
    rt_mr1: bytes | None = None
    rt_mr2: bytes | None = None
    rt_mr3: bytes | None = None
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    #: The TDX module measurements accepted (any of them).
    mr_seam: tuple[bytes, ...] | None = None
    #: TEE_TCB_SVN floor, compared byte by byte.
    min_tee_tcb_svn: bytes | None = None
    #: XFAM exactly, as the 8 bytes of the report.
    xfam: bytes | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # backstop for entries built in code; the parser reports errors with their path
        for _, attr, _ in _TDX_REGISTERS:
            mr = getattr(self, attr)
            if (mr is not None or attr == "mr_td") and (not isinstance(mr, bytes) or len(mr) != 48):
                raise PolicyError(f"TdxEntry: {attr}: must be 48 bytes")
        if self.mr_seam is not None:
            object.__setattr__(self, "mr_seam", tuple(self.mr_seam))
            if not self.mr_seam or any(
                not isinstance(m, bytes) or len(m) != 48 for m in self.mr_seam
            ):
                raise PolicyError("TdxEntry: mr_seam: must be a non-empty list of 48-byte values")
        for attr, size in (("min_tee_tcb_svn", 16), ("xfam", 8)):
            v = getattr(self, attr)
            if v is not None and (not isinstance(v, bytes) or len(v) != size):
                raise PolicyError(f"TdxEntry: {attr}: must be {size} bytes")

    def label(self, index: int) -> str:
        """``tdx_mrs[i]`` plus the entry's name when it has one."""
        return f"{_TDX_KEY}[{index}]" + (f" ({show(self.name)})" if self.name else "")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        for key, attr, _ in _TDX_REGISTERS:
            value = getattr(self, attr)
            if value is not None:
                out[key] = value.hex()
        if self.mr_seam is not None:
            out["mr_seam"] = [m.hex() for m in self.mr_seam]
        if self.min_tee_tcb_svn is not None:
            out["min_tee_tcb_svn"] = self.min_tee_tcb_svn.hex()
        if self.xfam is not None:
            out["xfam"] = self.xfam.hex()
        return out

    def mismatch(self, td: TdIdentity) -> list[str]:
        """Why ``td`` does not match, one phrase per field (empty when it matches)."""
        out: list[str] = []
        for _, attr, label in _TDX_REGISTERS:
            want = getattr(self, attr)
            have: bytes = getattr(td, attr)
            if want is not None and have != want:
                out.append(f"{label} {have.hex()} (expected {want.hex()})")
        if self.mr_seam is not None and td.mr_seam not in self.mr_seam:
            out.append(f"MRSEAM {td.mr_seam.hex()} (not an allowed TDX module)")
        if self.min_tee_tcb_svn is not None and any(
            h < w for h, w in zip(td.tee_tcb_svn, self.min_tee_tcb_svn, strict=True)
        ):
            out.append(
                f"TEE_TCB_SVN {td.tee_tcb_svn.hex()} (below the minimum "
                f"{self.min_tee_tcb_svn.hex()})"
            )
        xfam = td.xfam.to_bytes(8, "little")
        if self.xfam is not None and xfam != self.xfam:
            out.append(f"XFAM {xfam.hex()} (expected {self.xfam.hex()})")
        return out


@dataclass(frozen=True)
class TcbAllowances:
    """Which non-UpToDate TCB statuses are accepted; Revoked and unknown ones never are."""

    outdated: bool = False
    hw_config_needed: bool = False
    sw_hardening_needed: bool = False

    def __post_init__(self) -> None:
        # a truthy string such as "off" must not silently widen the policy
        for attr in ("outdated", "hw_config_needed", "sw_hardening_needed"):
            if not isinstance(getattr(self, attr), bool):
                raise PolicyError(f"TcbAllowances: {attr}: must be a bool")

    def _allowed(self, key: str) -> bool:
        return {
            "allow_outdated_tcb": self.outdated,
            "allow_hw_config_needed": self.hw_config_needed,
            "allow_sw_hardening_needed": self.sw_hardening_needed,
        }[key]

    def union(self, other: TcbAllowances) -> TcbAllowances:
        return TcbAllowances(
            outdated=self.outdated or other.outdated,
            hw_config_needed=self.hw_config_needed or other.hw_config_needed,
            sw_hardening_needed=self.sw_hardening_needed or other.sw_hardening_needed,
        )

    def check(self, status: str) -> None:
        """Raise TcbStatusRefused unless a platform with TCB ``status`` is accepted."""
        if status == "Revoked":
            raise TcbStatusRefused("TCB status Revoked is always refused")
        needs = _TCB_NEEDS.get(status) if isinstance(status, str) else None
        if needs is None:
            # fail closed: a status we do not know may mean anything
            raise TcbStatusRefused(f"TCB status {show(status)} is unknown and refused")
        missing = [key for key in needs if not self._allowed(key)]
        if missing:
            raise TcbStatusRefused(
                f"TCB status {status} is not allowed (set {' and '.join(missing)} "
                f'to "on" to accept it)'
            )


@dataclass(frozen=True)
class Policy:
    """The peer-acceptance policy; see the module docstring for the file format."""

    verify_mr_enclave: bool
    verify_mr_signer: bool
    verify_isv_prod_id: bool
    verify_isv_svn: bool
    entries: tuple[MeasurementEntry, ...]
    tcb: TcbAllowances = field(default_factory=TcbAllowances)
    #: Lowest tcbEvaluationDataNumber accepted in TCB info and QE identity (None: any).
    min_tcb_evaluation_data_number: int | None = None
    #: Oldest collateral accepted, in days before the verification time (None: any).
    max_collateral_age_days: int | None = None
    #: The accepted TDX VMs (``tdx_mrs``); empty: no TD is accepted.
    tdx_entries: tuple[TdxEntry, ...] = ()

    def __post_init__(self) -> None:
        # invariants hold however the policy was built, not only when parsed
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "tdx_entries", tuple(self.tdx_entries))
        for tdx_entry in self.tdx_entries:
            if not isinstance(tdx_entry, TdxEntry):
                raise PolicyError("Policy: tdx_entries: must be TdxEntry objects")
        for attr, low, high in (
            (_MIN_EVALUATION_KEY, 0, _MAX_EVALUATION_NUMBER),
            (_MAX_AGE_KEY, 1, _MAX_AGE_DAYS),
        ):
            value = getattr(self, attr)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
            ):
                raise PolicyError(f"Policy: {attr}: must be an integer {low}..{high} or None")
        for flag in _VERIFY_KEYS:
            if not isinstance(getattr(self, flag), bool):
                raise PolicyError(f"Policy: {flag}: must be a bool")
        enabled = [flag for flag in _VERIFY_KEYS if getattr(self, flag)]
        for entry in self.entries:
            if not isinstance(entry, MeasurementEntry):
                raise PolicyError("Policy: entries: must be MeasurementEntry objects")
        if enabled and not self.entries and not self.tdx_entries:
            raise PolicyError(
                f"Policy: sgx_mrs: must list at least one entry when {enabled[0]} is on"
            )
        for i, entry in enumerate(self.entries):
            for attr, _, flag in _FIELDS:
                if getattr(self, flag) and getattr(entry, attr) is None:
                    raise PolicyError(f"Policy: sgx_mrs[{i}].{attr}: required when {flag} is on")
        if not enabled and (self.entries or not self.tdx_entries):
            log.warning(
                "POLICY VERIFIES NO MEASUREMENT: all verify_* flags are off, so ANY enclave "
                "on a genuine SGX platform will be accepted as a peer"
            )

    # ---- parsing -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, *, source: str = "policy") -> Policy:
        """Build a policy from parsed JSON; errors are ``<source>: <field>: <problem>``."""
        if not isinstance(data, dict):
            raise PolicyError(
                f"{source}: expected a JSON object at the top level, got {show(data)}"
            )
        _check_keys(data, _TOP_KEYS, f"{source}: ")
        flags: dict[str, bool] = {}
        for key in _VERIFY_KEYS:
            if key not in data:
                # fail closed: a forgotten flag must not silently disable a check
                raise PolicyError(f'{source}: {key}: missing (set it to "on" or "off")')
            flags[key] = _parse_flag(data[key], f"{source}: {key}")
        allow = {key: _parse_flag(data.get(key, False), f"{source}: {key}") for key in _ALLOW_KEYS}

        tdx_entries: tuple[TdxEntry, ...] = ()
        if _TDX_KEY in data:
            raw_tdx = data[_TDX_KEY]
            if not isinstance(raw_tdx, list) or not raw_tdx:
                raise PolicyError(
                    f"{source}: {_TDX_KEY}: expected a non-empty list of TDX entries, "
                    f"got {show(raw_tdx)}"
                )
            tdx_entries = tuple(
                _parse_tdx_entry(raw, f"{source}: {_TDX_KEY}[{i}]") for i, raw in enumerate(raw_tdx)
            )
        if "sgx_mrs" not in data and not tdx_entries:
            raise PolicyError(
                f"{source}: sgx_mrs: missing (a list of measurement entries); a policy "
                f"for TDX VMs only lists them in {_TDX_KEY} instead"
            )
        raw_entries = data.get("sgx_mrs", [])
        if not isinstance(raw_entries, list):
            raise PolicyError(f"{source}: sgx_mrs: expected a list, got {show(raw_entries)}")
        enabled = [key for key in _VERIFY_KEYS if flags[key]]
        if enabled and not raw_entries and not tdx_entries:
            raise PolicyError(
                f"{source}: sgx_mrs: is empty, but {enabled[0]} is on (list at least one entry)"
            )
        entries = tuple(
            _parse_entry(raw, flags, f"{source}: sgx_mrs[{i}]") for i, raw in enumerate(raw_entries)
        )
        # Present means a rule: null is not "no rule" but an error, like any odd value.
        min_evaluation = (
            _parse_int(
                data[_MIN_EVALUATION_KEY],
                f"{source}: {_MIN_EVALUATION_KEY}",
                0,
                _MAX_EVALUATION_NUMBER,
            )
            if _MIN_EVALUATION_KEY in data
            else None
        )
        max_age = (
            _parse_int(data[_MAX_AGE_KEY], f"{source}: {_MAX_AGE_KEY}", 1, _MAX_AGE_DAYS)
            if _MAX_AGE_KEY in data
            else None
        )
        return cls(
            verify_mr_enclave=flags["verify_mr_enclave"],
            verify_mr_signer=flags["verify_mr_signer"],
            verify_isv_prod_id=flags["verify_isv_prod_id"],
            verify_isv_svn=flags["verify_isv_svn"],
            entries=entries,
            tcb=TcbAllowances(
                outdated=allow["allow_outdated_tcb"],
                hw_config_needed=allow["allow_hw_config_needed"],
                sw_hardening_needed=allow["allow_sw_hardening_needed"],
            ),
            min_tcb_evaluation_data_number=min_evaluation,
            max_collateral_age_days=max_age,
            tdx_entries=tdx_entries,
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy JSON file; every failure is a one-line PolicyError naming ``path``."""
        where = str(path)
        text = read_user_text(path, lambda problem: PolicyError(f"{where}: {problem}"))

        data = strict_json_loads(text, lambda problem: PolicyError(f"{where}: {problem}"))
        return cls.from_dict(data, source=where)

    def to_dict(self) -> dict[str, object]:
        """The seed's schema: "on"/"off" flags, hex MRs, ISV values as decimal strings."""
        on_off = {True: "on", False: "off"}
        out: dict[str, object] = {key: on_off[bool(getattr(self, key))] for key in _VERIFY_KEYS}
        out["allow_outdated_tcb"] = on_off[self.tcb.outdated]
        out["allow_hw_config_needed"] = on_off[self.tcb.hw_config_needed]
        out["allow_sw_hardening_needed"] = on_off[self.tcb.sw_hardening_needed]
        out["sgx_mrs"] = [entry.to_dict() for entry in self.entries]
        if self.tdx_entries:
            out[_TDX_KEY] = [entry.to_dict() for entry in self.tdx_entries]
        if self.min_tcb_evaluation_data_number is not None:
            out[_MIN_EVALUATION_KEY] = self.min_tcb_evaluation_data_number
        if self.max_collateral_age_days is not None:
            out[_MAX_AGE_KEY] = self.max_collateral_age_days
        return out

    def with_tcb(self, tcb: TcbAllowances) -> Policy:
        """This policy with ``tcb`` added to its TCB allowances.

        Union, not replacement: command-line flags may widen what the file allows, but
        leaving them unset must not drop an allowance the file grants.
        """
        merged = self.tcb.union(tcb)
        return self if merged == self.tcb else replace(self, tcb=merged)

    # ---- checking ----------------------------------------------------------------

    def check(self, identity: EnclaveIdentity, tcb_status: str) -> MeasurementEntry:
        """Return the entry ``identity`` matches, or raise PolicyViolation saying why not.

        Order: attributes, TCB status, then entries. With all verify flags off, the
        first entry is returned, or a blank entry when there are none.
        """
        _check_attributes(identity.attribute_flags)
        self.tcb.check(tcb_status)
        if not self.entries:
            if self.tdx_entries:
                # A TDX-only policy: an SGX enclave was never meant to be accepted.
                raise PolicyViolation(
                    f"peer is an SGX enclave, but the policy lists none (sgx_mrs is empty; "
                    f"only {_TDX_KEY} VMs are accepted)"
                )
            return MeasurementEntry(None, None, None, None)
        best: tuple[int, int, list[str]] | None = None
        for index, entry in enumerate(self.entries):
            mismatched = self._mismatches(entry, identity)
            if not mismatched:
                return entry
            if best is None or len(mismatched) < len(best[2]):
                best = (index, len(mismatched), mismatched)
        assert best is not None
        index, _, mismatched = best
        raise PolicyViolation(_describe(self.entries[index], index, identity, mismatched))

    def check_td(self, td: TdIdentity, tcb_status: str) -> TdxEntry:
        """Return the ``tdx_mrs`` entry ``td`` matches, or raise PolicyViolation saying why.

        Order: TD attributes, TCB status, then entries (the closest one is named).
        """
        if td.td_attributes & TdAttributeFlag.DEBUG:
            raise PolicyViolation(
                "peer is a DEBUG TD (its memory and state are readable by the host)"
            )
        if not td.td_attributes & TdAttributeFlag.SEPT_VE_DISABLE:
            raise PolicyViolation(
                "peer TD lacks the SEPT_VE_DISABLE attribute (refused: the host could "
                "inject #VE exceptions)"
            )
        self.tcb.check(tcb_status)
        if not self.tdx_entries:
            raise PolicyViolation(
                f"peer is a TDX VM, but the policy lists none (add it to {_TDX_KEY})"
            )
        best: tuple[int, list[str]] | None = None
        for index, entry in enumerate(self.tdx_entries):
            problems = entry.mismatch(td)
            if not problems:
                return entry
            if best is None or len(problems) < len(best[1]):
                best = (index, problems)
        assert best is not None
        index, problems = best
        where = self.tdx_entries[index].label(index)
        text = f"peer TD matches no {_TDX_KEY} entry (closest: {where}: {problems[0]})"
        if problems[1:]:
            text += f"; it also differs in {len(problems) - 1} more field(s)"
        raise PolicyViolation(text)

    def check_collateral(self, info: CollateralInfo, at: int) -> None:
        """Raise PolicyViolation unless the (verified) collateral meets the policy's rules.

        ``at`` is the verification time: a receipt checked later is judged as of its
        issue time, as the live peer was.
        """
        floor = self.min_tcb_evaluation_data_number
        if floor is not None:
            for item in info.items:
                if item.kind not in ("TCB info", "QE identity"):
                    continue
                if item.evaluation_number is None or item.evaluation_number < floor:
                    have = "none" if item.evaluation_number is None else item.evaluation_number
                    raise PolicyViolation(
                        f"collateral's {item.label} has TCB evaluation data number {have}, "
                        f"below the policy's {_MIN_EVALUATION_KEY} {floor} (fetch current "
                        "collateral from the PCCS)"
                    )
        max_days = self.max_collateral_age_days
        if max_days is not None:
            for item in info.items:
                age = at - item.issued
                if age > max_days * _DAY_SECONDS:
                    raise PolicyViolation(
                        f"collateral's {item.label} was issued {age // _DAY_SECONDS} days "
                        f"before the verification time, more than the policy's "
                        f"{_MAX_AGE_KEY} {max_days} (fetch current collateral from the PCCS)"
                    )

    def _mismatches(self, entry: MeasurementEntry, identity: EnclaveIdentity) -> list[str]:
        out: list[str] = []
        for attr, _, flag in _FIELDS:
            if not getattr(self, flag):
                continue
            want = getattr(entry, attr)
            have = getattr(identity, attr)
            # ISV_SVN is a minimum (newer security versions are accepted); the rest are equal
            ok = have >= want if attr == "isv_svn" else have == want
            if not ok:
                out.append(attr)
        return out


def _parse_entry(raw: object, flags: dict[str, bool], where: str) -> MeasurementEntry:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected an object, got {show(raw)}")
    _check_keys(raw, _ENTRY_KEYS, f"{where}.")

    def present(attr: str, flag: str) -> bool:
        if attr in raw:
            return True
        if flags[flag]:
            raise PolicyError(f"{where}.{attr}: missing, but {flag} is on")
        return False

    def mr(attr: str, flag: str) -> bytes | None:
        return _parse_mr(raw[attr], f"{where}.{attr}") if present(attr, flag) else None

    def u16(attr: str, flag: str) -> int | None:
        return _parse_u16(raw[attr], f"{where}.{attr}") if present(attr, flag) else None

    return MeasurementEntry(
        mr_enclave=mr("mr_enclave", "verify_mr_enclave"),
        mr_signer=mr("mr_signer", "verify_mr_signer"),
        isv_prod_id=u16("isv_prod_id", "verify_isv_prod_id"),
        isv_svn=u16("isv_svn", "verify_isv_svn"),
        name=_parse_name(raw["name"], f"{where}.name") if "name" in raw else None,
    )


def _parse_tdx_entry(raw: object, where: str) -> TdxEntry:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected an object, got {show(raw)}")
    _check_keys(raw, _TDX_ENTRY_KEYS, f"{where}.")
    if "mr_td" not in raw:
        # fail closed: an entry without MRTD would accept any VM image
        raise PolicyError(f"{where}.mr_td: missing (every TDX entry pins the VM image's MRTD)")
    registers = {
        attr: _parse_hex(raw[key], f"{where}.{key}", 48)
        for key, attr, _ in _TDX_REGISTERS
        if key in raw
    }
    mr_seam: tuple[bytes, ...] | None = None
    if "mr_seam" in raw:
        raw_seam = raw["mr_seam"]
        if not isinstance(raw_seam, list) or not raw_seam:
            raise PolicyError(
                f"{where}.mr_seam: expected a non-empty list of TDX module measurements "
                f"(96 hex characters each), got {show(raw_seam)}"
            )
        mr_seam = tuple(_parse_hex(m, f"{where}.mr_seam[{i}]", 48) for i, m in enumerate(raw_seam))
    return TdxEntry(
        mr_td=registers.pop("mr_td"),
        **registers,
        mr_seam=mr_seam,
        min_tee_tcb_svn=(
            _parse_hex(raw["min_tee_tcb_svn"], f"{where}.min_tee_tcb_svn", 16)
            if "min_tee_tcb_svn" in raw
            else None
        ),
        xfam=_parse_hex(raw["xfam"], f"{where}.xfam", 8) if "xfam" in raw else None,
        name=_parse_name(raw["name"], f"{where}.name") if "name" in raw else None,
    )


def _check_attributes(flags: int) -> None:
    """Gramine's fixed attribute rules; not configurable on purpose."""
    if flags & AttributeFlag.DEBUG:
        raise PolicyViolation("peer is a DEBUG enclave (its memory is readable by the host)")
    if not flags & AttributeFlag.INIT:
        raise PolicyViolation("peer enclave lacks the INIT attribute (not initialised)")
    if not flags & AttributeFlag.MODE64BIT:
        raise PolicyViolation("peer enclave lacks the MODE64BIT attribute (not a 64-bit enclave)")
    if flags & AttributeFlag.PROVISION_KEY:
        raise PolicyViolation("peer enclave has the PROVISION_KEY attribute (refused)")
    if flags & AttributeFlag.EINITTOKEN_KEY:
        raise PolicyViolation("peer enclave has the EINITTOKEN_KEY attribute (refused)")


def _describe(
    entry: MeasurementEntry, index: int, identity: EnclaveIdentity, mismatched: list[str]
) -> str:
    """One line: the first mismatching field of the closest entry, expected vs actual."""
    attr = mismatched[0]
    label = _LABELS[attr]
    want = getattr(entry, attr)
    have = getattr(identity, attr)
    where = entry.label(index)
    if attr == "isv_svn":
        text = f"peer ISV_SVN {have} is below the required {want} ({where})"
    else:
        shown_have = have.hex() if isinstance(have, bytes) else str(have)
        shown_want = want.hex() if isinstance(want, bytes) else str(want)
        text = (
            f"peer {label} {shown_have} matches no sgx_mrs entry "
            f"(closest: {where} expects {shown_want})"
        )
    others = [_LABELS[a] for a in mismatched[1:]]
    if others:
        text += f"; {where} also differs in {', '.join(others)}"
    return text


def tdx_entry_for(name: str, td: TdIdentity) -> TdxEntry:
    """A ``tdx_mrs`` entry pinning every register, the TDX module and the TCB of ``td``."""
    return TdxEntry(
        mr_td=td.mr_td,
        rt_mr0=td.rt_mr0,
        rt_mr1=td.rt_mr1,
        rt_mr2=td.rt_mr2,
        rt_mr3=td.rt_mr3,
        mr_config_id=td.mr_config_id,
        mr_owner=td.mr_owner,
        mr_owner_config=td.mr_owner_config,
        mr_seam=(td.mr_seam,),
        min_tee_tcb_svn=td.tee_tcb_svn,
        xfam=td.xfam.to_bytes(8, "little"),
        name=_parse_name(name, f"tdx_entry_for: {name!r}"),
    )


def policy_for(
    identities: Sequence[tuple[str, EnclaveIdentity]],
    tds: Sequence[tuple[str, TdIdentity]] = (),
) -> Policy:
    """A policy accepting exactly these enclaves (all four fields verified) and TDs.

    Used by ``teepsi measure`` to write the policy file for a deployment.
    """
    if not identities and not tds:
        raise PolicyError("policy_for: at least one identity is required")
    entries = tuple(
        MeasurementEntry(
            mr_enclave=ident.mr_enclave,
            mr_signer=ident.mr_signer,
            isv_prod_id=ident.isv_prod_id,
            isv_svn=ident.isv_svn,
            name=_parse_name(name, f"policy_for: {name!r}"),
        )
        for name, ident in identities
    )
    return Policy(
        verify_mr_enclave=True,
        verify_mr_signer=True,
        verify_isv_prod_id=True,
        verify_isv_svn=True,
        entries=entries,
        tdx_entries=tuple(tdx_entry_for(name, td) for name, td in tds),
    )
